"""Preference sets -> token pairs, every record that cannot be used counted by reason with its line.

Layouts (told apart per record / by the path):
  HH-RLHF JSONL(.gz)        {"chosen": dialogue, "rejected": dialogue}: converted exactly as prep does
                            (data_prep.hh.convert_pair: "Human:" -> "User:", the same prompt required)
  prompt/chosen/rejected    {"prompt", "chosen", "rejected", "subset"?}: RewardBench's layout; the
                            prompt and each response joined by the template (RewardEvalConfig.template)
  comparison mmap prefix    prep's {split}_comparisons .bin/.idx: pair i = documents 2i (chosen), 2i+1
Token sequences end with EOS, as prep's comparisons (--append-eod), so the reward is read where the
reward model was trained to give it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from data_prep.hh import PROMPT_FORMATS, START_PROMPT_FORMAT, PromptFormat, convert_pair
from data_prep.report import DropLog
from data_prep.sources import read_jsonl

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")


@dataclass
class Pair:
    chosen: List[int]
    rejected: List[int]
    subset: str
    source: str
    line: int


def join(prompt: str, response: str, template: Optional[str]) -> str:
    if template:
        return template.format(prompt=prompt, response=response)
    if prompt.rstrip().endswith("Assistant:"):  # already a dialogue in prep's layout (its prompts file)
        return prompt.rstrip() + " " + response.lstrip()
    return START_PROMPT_FORMAT.format(body=prompt, response=response)


def _texts(record, template, fmt: PromptFormat = PROMPT_FORMATS["nemo"]) -> Tuple[Optional[Tuple[str, str, str]], Optional[str]]:
    """A record -> ((chosen text, rejected text, subset), None) or (None, reason)."""
    if not isinstance(record, dict):
        return None, "not_an_object"
    subset = record.get("subset", "all")
    if not isinstance(subset, str):
        return None, "subset_not_a_string"
    if "prompt" in record:
        for key in ("prompt", "chosen", "rejected"):
            if record.get(key) is None:
                return None, f"missing_{key}"
            if not isinstance(record[key], str):
                return None, f"{key}_not_a_string"
        if not record["chosen"].strip() or not record["rejected"].strip():
            return None, "empty_response"
        p = record["prompt"]
        return (join(p, record["chosen"], template), join(p, record["rejected"], template), subset), None
    pair, reason = convert_pair(record, fmt)
    if reason is not None:
        return None, reason
    return (pair["chosen"], pair["rejected"], subset), None


def read_jsonl_pairs(path: str, tokenizer, seq_length: int, drops: DropLog, template: Optional[str] = None,
                     max_pairs: Optional[int] = None, fmt: PromptFormat = PROMPT_FORMATS["nemo"]) -> List[Pair]:
    label = os.path.basename(path)
    kept: List[Tuple[str, str, str, int]] = []
    for _, line, record in read_jsonl(path, label):
        if max_pairs is not None and len(kept) >= max_pairs:
            break
        reason = getattr(record, "reason", None)
        texts = None
        if reason is None:
            texts, reason = _texts(record, template, fmt)
        if reason is not None:
            drops.add(reason, label, line)
            continue
        kept.append((*texts, line))
    ids = tokenizer.encode_batch([t for c, r, _, _ in kept for t in (c, r)]) if kept else []
    eos = [tokenizer.eos_id]
    pairs = []
    for i, (_, _, subset, line) in enumerate(kept):
        c, r = list(ids[2 * i]) + eos, list(ids[2 * i + 1]) + eos
        if max(len(c), len(r)) > seq_length:
            drops.add("overlong", label, line)
            continue
        pairs.append(Pair(c, r, subset, label, line))
    return pairs


def read_mmap_pairs(prefix: str, seq_length: int, drops: DropLog, max_pairs: Optional[int] = None) -> List[Pair]:
    from data_prep.indexed import bin_path, read_index

    dtype, sizes, pointers, _ = read_index(prefix)
    if len(sizes) % 2:
        raise ValueError(f"{prefix}: {len(sizes)} documents, not chosen/rejected pairs (an even count)")
    tokens = np.memmap(bin_path(prefix), dtype=dtype, mode="r")
    item = np.dtype(dtype).itemsize
    label = os.path.basename(prefix)
    pairs = []
    for i in range(len(sizes) // 2):
        if max_pairs is not None and len(pairs) >= max_pairs:
            break
        docs = [tokens[pointers[d] // item: pointers[d] // item + sizes[d]].tolist() for d in (2 * i, 2 * i + 1)]
        if max(map(len, docs)) > seq_length:
            drops.add("overlong", label, i + 1)
            continue
        pairs.append(Pair(docs[0], docs[1], "all", label, i + 1))
    return pairs


def load_pairs(path: str, tokenizer, seq_length: int, drops: DropLog, template: Optional[str] = None,
               max_pairs: Optional[int] = None, fmt: PromptFormat = PROMPT_FORMATS["nemo"]) -> List[Pair]:
    """Raw HH records are written in `fmt` (data.prompt_format), as prep writes them."""
    if path.endswith(JSONL_SUFFIXES):
        if not os.path.exists(path):
            raise FileNotFoundError(f"preference set {path} does not exist")
        return read_jsonl_pairs(path, tokenizer, seq_length, drops, template, max_pairs, fmt)
    if os.path.exists(path + ".bin") and os.path.exists(path + ".idx"):
        return read_mmap_pairs(path, seq_length, drops, max_pairs)
    raise FileNotFoundError(f"preference set {path}: neither a .jsonl(.gz) file nor a mmap prefix "
                            "(<prefix>.bin and <prefix>.idx)")
