"""Data-prep configuration: HH-RLHF source, tokenizer, mmap output."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class DataTokenizerConfig:
    # sentencepiece (.model) | huggingface (tokenizer.json or dir) | nemo (tokenizer inside a .nemo)
    # null with model null: train a sentencepiece BPE of `vocab_size` on the training text.
    library: Optional[str] = None
    model: Optional[str] = None
    vocab_size: int = 8000


@dataclass
class DataConfig:
    name: str = "hh_rlhf"
    source: str = "sample"  # sample (embedded, offline) | hub | local
    path: Optional[str] = None  # source=local: a .jsonl[.gz] file or an HH-layout directory
    hub_name: str = "Anthropic/hh-rlhf"
    subsets: List[str] = field(default_factory=list)  # HH data_dir names; empty = all
    splits: List[str] = field(default_factory=lambda: ["train", "test"])
    max_pairs: Optional[int] = None  # cap per split, for quick runs
    # an input file cut short (a truncated .jsonl.gz, a last line ending mid-record) fails the stage;
    # true keeps the records read before the cut (counted as unreadable_file in report.json)
    allow_truncated_input: bool = False
    tokenizer: DataTokenizerConfig = field(default_factory=DataTokenizerConfig)
    workers: int = 2
    append_eod: bool = True
    output_prefix: str = "hh_comparison"
    # how dialogues are written: nemo (the hands-on's "User: ...\n\nAssistant: ...", byte for byte) |
    # chatml (<|im_start|>user ... <|im_end|>, for ChatML models such as SmolLM2): data_prep.hh.PROMPT_FORMATS
    prompt_format: str = "nemo"
