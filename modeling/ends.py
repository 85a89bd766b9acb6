"""What ends a sampled response: NeMo's `sampling_params.end_strings`, split into end tokens (checked on
the GPU) and strings (checked on the detokenized text). PPO's rollouts and stage=eval's policy samples
stop at the same place."""
from __future__ import annotations

import re
from typing import Callable, List, Optional, Sequence

_ESCAPES = {"\\n": "\n", "\\t": "\t", "\\r": "\r", "\\\\": "\\"}


def unescape(text: str) -> str:
    """`\\n`, `\\t`, `\\r` and `\\\\` in an end string as the characters they name: Hydra's command line
    keeps a backslash-n as two characters (and so does single-quoted YAML), so
    `end_strings=["\\n\\nUser:"]` means a blank line then "User:" wherever it is written."""
    return re.sub(r"\\[ntr\\]", lambda m: _ESCAPES[m.group()], text)


def default_end_strings(tokenizer) -> List[str]:
    """What ends a response when `sampling_params.end_strings` is null: the tokenizer's EOS and the
    end-of-turn tokens its vocabulary has (SmolLM2: <|im_end|>, <|endoftext|>; GPT-2B-001's
    sentencepiece: <extra_id_1>, NeMo's turn marker), and the HH prompt format's next user turn
    ("\\n\\nUser:", data_prep.hh): a policy that starts the user's turn has finished its own."""
    from data_prep.hh import NEXT_TURN_MARKER
    from data_prep.tokenizers import END_OF_TURN_NAMES

    lookup = getattr(tokenizer, "token_id", None)
    names = [getattr(tokenizer, "eos_token", None), *END_OF_TURN_NAMES]
    out = [n for n in dict.fromkeys(names) if n and lookup is not None and lookup(n) is not None]
    return out + [NEXT_TURN_MARKER]


class EndCondition:
    """NeMo's end_strings split into token ids (special tokens and strings that are one token: checked
    on the GPU every step) and the rest (checked on the detokenized text, a host sync per step).
    `end_strings` None = `default_end_strings(tokenizer)`."""

    def __init__(self, tokenizer, end_strings: Optional[Sequence[str]]):
        self.end_strings = default_end_strings(tokenizer) if end_strings is None else [unescape(s) for s in end_strings]
        self.token_ids, self.strings = [], []
        lookup = getattr(tokenizer, "token_id", None)
        for s in self.end_strings:
            tid = lookup(s) if lookup is not None and s.startswith("<") else None
            ids = [tid] if tid is not None else tokenizer.encode(s)
            if len(ids) == 1 and (tid is not None or tokenizer.decode(ids) == s):
                self.token_ids.append(ids[0])
            else:
                self.strings.append(s)
        self.detokenize: Callable = tokenizer.decode
