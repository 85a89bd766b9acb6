"""HH-RLHF dialogues -> NeMo's prompt/comparison JSONL, byte for byte as the hands-on's
`process_anthropic_hh.py`, but streamed (one pair at a time) and with every dropped pair counted.

The hands-on builds whole lists and writes `"\\n".join(json.dumps(...))`: no trailing newline.
`JoinedJsonlWriter` writes the same bytes incrementally so memory stays flat on any input size.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Iterable, Optional, Tuple

from tqdm import tqdm

from data_prep.errors import remove_quietly
from data_prep.report import DropLog

log = logging.getLogger(__name__)

START_PROMPT_FORMAT = "User: {body}\n\nAssistant: {response}"
PROMPT_CONTINUATION_FORMAT = "{text}\n\nUser: {body}\n\nAssistant: {response}"
# where the user's next turn begins in that format: a policy that writes it has ended its own turn
NEXT_TURN_MARKER = "\n\nUser:"


@dataclass(frozen=True)
class PromptFormat:
    """How HH's turns are written out. `first`/`continuation` render a turn (the dialogue so far in
    `text`), `prompt_cut` characters come off the end of the prompt (the hands-on drops the space after
    "Assistant:"), `next_turn` is where the user's next turn starts (an end string for rollouts)."""
    name: str
    first: str
    continuation: str
    prompt_cut: int
    next_turn: str
    needs_tokens: Tuple[str, ...] = ()  # special tokens the tokenizer must have as single tokens


# `data.prompt_format`:
#  nemo:   the hands-on's process_anthropic_hh.py, byte for byte ("User: ...\n\nAssistant: ...").
#  chatml: the chat template of ChatML models (SmolLM2, Qwen): "<|im_start|>user\n...<|im_end|>\n
#          <|im_start|>assistant\n...". The last response is left open: prep's EOD token (append_eod),
#          <|im_end|> for these tokenizers, closes it, as the policy closes its own answers.
PROMPT_FORMATS = {
    "nemo": PromptFormat("nemo", START_PROMPT_FORMAT, PROMPT_CONTINUATION_FORMAT, 1, NEXT_TURN_MARKER),
    "chatml": PromptFormat(
        "chatml",
        "<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n{response}",
        "{text}<|im_end|>\n<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n{response}",
        0, "<|im_start|>user", ("<|im_start|>", "<|im_end|>")),
}


def prompt_format(name: Optional[str]) -> PromptFormat:
    try:
        return PROMPT_FORMATS[name or "nemo"]
    except KeyError:
        raise ValueError(f"data.prompt_format={name!r}: expected one of {', '.join(PROMPT_FORMATS)}") from None


def convert_string_format(string: str, fmt: PromptFormat = PROMPT_FORMATS["nemo"]) -> Optional[Tuple[str, str]]:
    """One HH transcript -> (dialogue, prompt), or None when a turn does not split in two.

    Kept exactly as the hands-on for the nemo format (including its quirks: a transcript with no turns
    at all gives ("", ""), and the prompt is the dialogue up to the last "Assistant:" without its
    trailing space).
    """
    string_to_use = ""
    prompt_string_to_use = ""
    for item in string.split("\n\nHuman: "):
        if len(item) == 0:
            continue
        output = item.split("\n\nAssistant: ")
        if len(output) != 2:
            return None
        body, response = output
        if len(string_to_use) == 0:
            prompt_string_to_use = fmt.first.format(body=body, response="")
            string_to_use = fmt.first.format(body=body, response=response)
        else:
            prompt_string_to_use = fmt.continuation.format(text=string_to_use, body=body, response="")
            string_to_use = fmt.continuation.format(text=string_to_use, body=body, response=response)
    return string_to_use, (prompt_string_to_use[:-fmt.prompt_cut] if fmt.prompt_cut else prompt_string_to_use)


def convert_pair(record, fmt: PromptFormat = PROMPT_FORMATS["nemo"]) -> Tuple[Optional[dict], Optional[str]]:
    """A raw HH record -> ({"prompt","chosen","rejected"}, None) or (None, drop reason)."""
    if not isinstance(record, dict):
        return None, "not_an_object"
    for key in ("chosen", "rejected"):
        if key not in record:
            return None, f"missing_{key}"
        if not isinstance(record[key], str):
            return None, f"{key}_not_a_string"
    c = convert_string_format(record["chosen"], fmt)
    r = convert_string_format(record["rejected"], fmt)
    # the hands-on drops both cases silently; we name them
    if c is None:
        return None, "chosen_turns_do_not_split"
    if r is None:
        return None, "rejected_turns_do_not_split"
    if c[1] != r[1]:
        return None, "prompt_mismatch"
    if c[0] == r[0]:  # the same answer both ways: no preference, nothing for a reward model to learn
        return None, "chosen_equals_rejected"
    return {"prompt": c[1], "chosen": c[0], "rejected": r[0]}, None


class NoPairsKept(Exception):
    """A split kept no pair: nothing was committed."""

    def __init__(self, read: int):
        super().__init__(f"{read} records read, no pair kept")
        self.read = read


class JoinedJsonlWriter:
    """Writes `"\\n".join(json.dumps(x) for x in items)` one item at a time, to a tmp name;
    `commit()` moves it into place so an interrupted run never leaves a complete-looking file."""

    def __init__(self, path: str):
        self.path = path
        self.tmp = f"{path}.tmp-{os.getpid()}"
        self._f = open(self.tmp, "w", encoding="utf-8", newline="")
        self._first = True
        self.count = 0

    def write(self, item: dict) -> None:
        if not self._first:
            self._f.write("\n")
        self._f.write(json.dumps(item))  # default ensure_ascii, as the hands-on
        self._first = False
        self.count += 1

    def commit(self) -> None:
        self._f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Never raises: on a full disk the close fails too (its flush), and the file must still go."""
        try:
            self._f.close()
        except OSError:
            pass
        finally:
            remove_quietly(self.tmp)


def write_split(records: Iterable[Tuple[str, int, object]], out_dir: str, split: str,
                drops: DropLog, max_pairs: Optional[int] = None, fmt: PromptFormat = PROMPT_FORMATS["nemo"]) -> dict:
    """Stream (source, line, record-or-error) into `{split}_prompts.jsonl` / `{split}_comparisons.jsonl`.

    A record that failed to parse arrives as a `data_prep.sources.BadRecord`; it is counted and skipped.
    Returns {"read", "kept", "prompts", "comparisons"}. Keeping no pair raises NoPairsKept and
    writes nothing: an empty dataset would only fail later, in another stage.
    """
    prompts = JoinedJsonlWriter(os.path.join(out_dir, f"{split}_prompts.jsonl"))
    comps = JoinedJsonlWriter(os.path.join(out_dir, f"{split}_comparisons.jsonl"))
    read = kept = 0
    bar = tqdm(desc=f"{split}: HH -> JSONL", unit=" pairs", mininterval=1.0, total=max_pairs)
    try:
        for where, line, record in records:
            if max_pairs is not None and kept >= max_pairs:
                break
            read += 1
            reason = getattr(record, "reason", None)  # BadRecord from the reader
            if reason is None:
                pair, reason = convert_pair(record, fmt)
            if reason is not None:
                drops.add(reason, where, line)
                continue
            prompts.write({"text": pair["prompt"]})
            comps.write({"text": pair["chosen"]})
            comps.write({"text": pair["rejected"]})
            kept += 1
            bar.update()
        if kept == 0:
            raise NoPairsKept(read)
        prompts.commit()
        comps.commit()
    except BaseException:
        prompts.abort()
        comps.abort()
        raise
    finally:
        bar.close()
    log.info("%s: %d records read, %d pairs kept, %d dropped", split, read, kept, read - kept)
    return {"read": read, "kept": kept, "prompts": prompts.path, "comparisons": comps.path}
