"""`python -m data_prep`: the prep stage without the launcher, in the hands-on's own terms.

    python -m data_prep --source local --path /data/hh-rlhf --output-dir D [--tokenizer-model M]
        the whole stage (JSONL, tokenizer, mmap, report.json), as `launcher/main.py stage=prep`
    python -m data_prep convert --output-dir D [--source ...]
        only the JSONL step: the hands-on's `python process_anthropic_hh.py --output-dir D`
    python -m data_prep preprocess --input train_comparisons.jsonl --output-prefix ./datasets/hh_comparison_train \\
        --tokenizer-model M --tokenizer-library sentencepiece --json-keys text --dataset-impl mmap \\
        --workers 30 --append-eod
        NeMo's preprocess_data_for_megatron.py, same flags, same output names
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional

from data_prep.config import DataConfig, DataTokenizerConfig


def _split_list(s: str) -> List[str]:
    return [x for x in s.split(",") if x]


def _source_args(p: argparse.ArgumentParser) -> None:
    d = DataConfig()
    p.add_argument("--source", default=d.source, choices=["sample", "local", "hub"])
    p.add_argument("--path", default=None, help="source=local: HH folder or .jsonl[.gz] file")
    p.add_argument("--hub-name", default=d.hub_name)
    p.add_argument("--subsets", type=_split_list, default=[], help="e.g. harmless-base,helpful-base")
    p.add_argument("--splits", type=_split_list, default=d.splits)
    p.add_argument("--max-pairs", type=int, default=None)
    p.add_argument("--allow-truncated-input", action="store_true",
                   help="keep the records read before a cut or corrupt input file (default: fail)")
    p.add_argument("--output-dir", default="./", help="where the files go (the hands-on's default)")


def _data_config(a, **extra) -> DataConfig:
    return DataConfig(source=a.source, path=a.path, hub_name=a.hub_name, subsets=a.subsets,
                      splits=a.splits, max_pairs=a.max_pairs,
                      allow_truncated_input=a.allow_truncated_input, **extra)


def cmd_prep(argv: List[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _source_args(p)
    d = DataConfig()
    p.add_argument("--tokenizer-library", default=None,
                   choices=["sentencepiece", "huggingface", "nemo"])
    p.add_argument("--tokenizer-model", default=None, help=".model, tokenizer.json, .gguf or .nemo")
    p.add_argument("--vocab-size", type=int, default=d.tokenizer.vocab_size,
                   help="when training a tokenizer (no --tokenizer-model)")
    p.add_argument("--restore-from-path", default=None,
                   help="a .nemo whose tokenizer to use (with --tokenizer-library nemo)")
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--no-append-eod", dest="append_eod", action="store_false")
    p.add_argument("--output-prefix", default=d.output_prefix)
    a = p.parse_args(argv)
    from data_prep.stage import prepare

    tok = DataTokenizerConfig(library=a.tokenizer_library, model=a.tokenizer_model,
                              vocab_size=a.vocab_size)
    data = _data_config(a, tokenizer=tok, workers=a.workers, append_eod=a.append_eod,
                        output_prefix=a.output_prefix)
    return prepare(data, a.output_dir, restore_from_path=a.restore_from_path)


def cmd_convert(argv: List[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m data_prep convert",
                                description="HH -> {split}_prompts.jsonl, {split}_comparisons.jsonl")
    _source_args(p)
    a = p.parse_args(argv)
    from data_prep.stage import prep_jsonl

    os.makedirs(a.output_dir, exist_ok=True)
    data = _data_config(a)
    return {split: prep_jsonl(data, a.output_dir, split) for split in a.splits}


def cmd_preprocess(argv: List[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m data_prep preprocess",
                                description="NeMo's preprocess_data_for_megatron.py (mmap only)")
    p.add_argument("--input", required=True, help="a JSONL file, one document per line")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer-model", required=True)
    p.add_argument("--tokenizer-library", default=None,
                   choices=["sentencepiece", "huggingface", "nemo", "megatron"])
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--dataset-impl", default="mmap", choices=["mmap"])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--append-eod", action="store_true")
    # accepted for 1:1 command lines; they change nothing for mmap (NeMo: retrieval format only)
    p.add_argument("--chunk_size", "--chunk-size", type=int, default=None)
    p.add_argument("--need-pad-id", action="store_true")
    a = p.parse_args(argv)
    if a.tokenizer_library == "megatron":
        p.error("--tokenizer-library megatron (GPT-2 BPE vocab/merges) is not supported; "
                "use huggingface with a tokenizer.json")
    from data_prep.stage import prep_mmap
    from data_prep.tokenizers import load_tokenizer

    out_dir = os.path.dirname(os.path.abspath(a.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tok = load_tokenizer(a.tokenizer_model, a.tokenizer_library, extract_dir=out_dir)
    return {key: prep_mmap(a.input, f"{a.output_prefix}_{key}_document", tok, a.workers,
                           a.append_eod, json_key=key) for key in a.json_keys}


COMMANDS = {"convert": cmd_convert, "preprocess": cmd_preprocess}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="[%(asctime)s][%(name)s] %(message)s", datefmt="%H:%M:%S")
    cmd = COMMANDS.get(argv[0]) if argv else None
    try:
        result = cmd(argv[1:]) if cmd else cmd_prep(argv)
    except Exception as e:  # noqa: BLE001 - a user-facing failure is one message, not a traceback
        if not getattr(e, "user_facing", False):
            raise
        logging.getLogger("data_prep").error("%s", e)
        return 1
    print(json.dumps(result, indent=2))
    return 0
