"""The prep stage, end to end: HH records -> `{split}_prompts.jsonl` / `{split}_comparisons.jsonl`
-> tokenizer -> `{prefix}_{split}_text_document.{bin,idx}` -> report.json.

Each step stores a fingerprint of what it was made from (input content, tokenizer, settings)
beside its outputs, written last; a re-run with the same fingerprint reuses the outputs, and an
interrupted step leaves no fingerprint, so it is redone.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Optional

from data_prep.config import DataConfig
from data_prep.errors import PrepError, clean_stale_tmp, disk_full
from data_prep.hh import NoPairsKept, prompt_format, write_split
from data_prep.indexed import bin_path, idx_path
from data_prep.report import DropLog, write_json_atomic
from data_prep.sources import iter_records, source_fingerprint, split_files
from data_prep.to_mmap import jsonl_to_mmap
from data_prep.tokenizers import install_tokenizer, load_tokenizer, train_sentencepiece

log = logging.getLogger(__name__)

# Bump when a step's output for the same input changes, so stale outputs are not reused.
# 2: pairs with chosen == rejected are dropped; allow_truncated_input is part of the JSONL step's key.
FORMAT_VERSION = 2
TRAINED_TOKENIZER = "tokenizer.model"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _load_fingerprint(path: str, key: str, outputs) -> Optional[dict]:
    """The stored step record when its key matches and every output is still there."""
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    if rec.get("key") != key or not all(os.path.isfile(p) for p in outputs):
        return None
    return rec


def _invalidate(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)  # before touching outputs: a half-rewritten step never looks complete


def prep_jsonl(data: DataConfig, out_dir: str, split: str) -> dict:
    """HH -> the split's prompt/comparison JSONL (reused when the input and settings are unchanged)."""
    fp_path = os.path.join(out_dir, f"{split}_jsonl.fingerprint.json")
    key = _key(step="jsonl", version=FORMAT_VERSION, source=data.source, hub=data.hub_name,
               subsets=list(data.subsets), max_pairs=data.max_pairs, split=split,
               allow_truncated_input=data.allow_truncated_input, input=source_fingerprint(data, split),
               **({"prompt_format": data.prompt_format} if data.prompt_format != "nemo" else {}))
    outputs = [os.path.join(out_dir, f"{split}_{k}.jsonl") for k in ("prompts", "comparisons")]
    rec = _load_fingerprint(fp_path, key, outputs)
    if rec:
        log.info("%s: JSONL up to date, reused", split)
        return dict(rec["report"], reused=True)
    _invalidate(fp_path)
    t0 = time.time()
    drops = DropLog()
    try:
        res = write_split(iter_records(data, split), out_dir, split, drops, data.max_pairs,
                          prompt_format(data.prompt_format))
    except NoPairsKept as e:
        raise PrepError(_no_pairs_message(data, split, e.read, drops)) from None
    identical = drops.counts.get("chosen_equals_rejected", 0)
    if identical:
        log.warning("%s: %d pairs have chosen == rejected: dropped, a pair without a preference teaches a reward "
                    "model nothing (report.json: dropped.lines.chosen_equals_rejected)", split, identical)
    report = {"records_read": res["read"], "pairs_kept": res["kept"], "identical_pairs_dropped": identical,
              "dropped": drops.to_dict(), "seconds": round(time.time() - t0, 3)}
    write_json_atomic(fp_path, {"key": key, "report": report})
    return dict(report, reused=False)


def _no_pairs_message(data: DataConfig, split: str, read: int, drops: DropLog) -> str:
    inputs = (f"{data.hub_name} (subsets {list(data.subsets) or 'all'})" if data.source == "hub"
              else ", ".join(split_files(data, split)))
    if not read:
        why = "it holds no record (an empty file?)"
    else:
        firsts = {r: {src: lines[:5] for src, lines in where.items()} for r, where in drops.where.items()}
        why = (f"{read} records read, every one dropped: {dict(drops.counts)}"
               + (f" (first lines: {firsts})" if firsts else "")
               + (f"; data.max_pairs={data.max_pairs}" if data.max_pairs is not None and data.max_pairs <= 0 else ""))
    return (f"{split}: no comparison pair (and no prompt) kept from {inputs}: {why}. HH records are "
            '{"chosen": ..., "rejected": ...}, two dialogues that share their prompt and differ in the last answer')


def iter_texts(jsonl_path: str):
    with open(jsonl_path, "rb") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["text"]


def prep_tokenizer(data: DataConfig, out_dir: str, restore_from_path: Optional[str] = None):
    """The tokenizer to use, installed in out_dir: given, inside a .nemo, or trained here."""
    tcfg = data.tokenizer
    model = tcfg.model
    if model is None and tcfg.library == "nemo":
        if not restore_from_path:
            raise ValueError("data.tokenizer.library=nemo needs data.tokenizer.model or "
                             "model.restore_from_path: the .nemo holding the tokenizer")
        model = restore_from_path
    if model is not None:
        tok = load_tokenizer(model, tcfg.library, extract_dir=out_dir)
        path = install_tokenizer(tok, out_dir)
        return load_tokenizer(path, tok.library), {"source": model, "trained": False}
    # none given: a BPE trained on the training dialogues (the tiny model's tokenizer)
    train_comps = os.path.join(out_dir, "train_comparisons.jsonl")
    if not os.path.isfile(train_comps):
        raise ValueError("training a tokenizer needs the train split: add 'train' to data.splits "
                         "or set data.tokenizer.model")
    path = os.path.join(out_dir, TRAINED_TOKENIZER)
    fp_path = path + ".fingerprint.json"
    key = _key(step="tokenizer", version=FORMAT_VERSION, vocab_size=tcfg.vocab_size,
               text=file_sha256(train_comps))
    if _load_fingerprint(fp_path, key, [path]):
        log.info("tokenizer up to date, reused: %s", path)
    else:
        _invalidate(fp_path)
        train_sentencepiece(iter_texts(train_comps), tcfg.vocab_size, path)
        write_json_atomic(fp_path, {"key": key})
    return load_tokenizer(path, "sentencepiece"), {"source": "trained on train_comparisons.jsonl",
                                                   "trained": True}


def prep_mmap(comparisons: str, prefix: str, tok, workers: int, append_eod: bool,
              json_key: str = "text") -> dict:
    """Comparison JSONL -> `{prefix}.bin/.idx` (reused when the text and tokenizer are unchanged)."""
    fp_path = prefix + ".fingerprint.json"
    key = _key(step="mmap", version=FORMAT_VERSION, append_eod=append_eod, json_key=json_key,
               text=file_sha256(comparisons), tokenizer=[file_sha256(p) for p in _tok_files(tok)])
    rec = _load_fingerprint(fp_path, key, [bin_path(prefix), idx_path(prefix)])
    if rec:
        log.info("%s.{bin,idx} up to date, reused", prefix)
        return dict(rec["report"], reused=True)
    _invalidate(fp_path)
    drops = DropLog()
    stats = jsonl_to_mmap(comparisons, prefix, tok, json_key, workers, append_eod, drops)
    stats["dropped"] = drops.to_dict()
    write_json_atomic(fp_path, {"key": key, "report": stats})
    return dict(stats, reused=False)


def _tok_files(tok):
    if hasattr(tok, "files"):
        return tok.files()
    files = [tok.path]
    cfg = os.path.join(os.path.dirname(tok.path), "tokenizer_config.json")
    return files + ([cfg] if os.path.isfile(cfg) else [])


def prepare(data: DataConfig, out_dir: str, restore_from_path: Optional[str] = None) -> dict:
    """Run every step into `out_dir`; returns the stage's artifacts (absolute paths)."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    clean_stale_tmp(out_dir)  # what a killed prep left mid-write
    try:
        return _prepare(data, out_dir, restore_from_path)
    except OSError as e:
        full = disk_full(e, out_dir)
        if full is None:
            raise
        raise full from None


def _prepare(data: DataConfig, out_dir: str, restore_from_path: Optional[str]) -> dict:
    t0 = time.time()
    splits = list(dict.fromkeys(data.splits))
    report = {"source": {"source": data.source, "path": data.path, "hub_name": data.hub_name,
                         "subsets": list(data.subsets), "max_pairs": data.max_pairs},
              "splits": {}}
    for split in splits:
        report["splits"][split] = {"jsonl": prep_jsonl(data, out_dir, split)}
    tok, tok_info = prep_tokenizer(data, out_dir, restore_from_path)
    fmt = prompt_format(data.prompt_format)
    missing = [t for t in fmt.needs_tokens if getattr(tok, "token_id", lambda _t: None)(t) is None]
    if missing:
        raise PrepError(f"data.prompt_format={fmt.name}: the tokenizer {tok.path} has no {' or '.join(missing)} "
                         f"token; use data.prompt_format=nemo, or a tokenizer of a {fmt.name} model")
    report["tokenizer"] = dict(tok_info, path=tok.path, library=tok.library,
                               vocab_size=tok.vocab_size, eos_id=tok.eos_id)
    prefixes, prompts, comparisons = {}, {}, {}
    for split in splits:
        comps = os.path.join(out_dir, f"{split}_comparisons.jsonl")
        prefix = os.path.join(out_dir, f"{data.output_prefix}_{split}_text_document")
        report["splits"][split]["mmap"] = prep_mmap(comps, prefix, tok, data.workers,
                                                    data.append_eod)
        prefixes[split] = prefix
        prompts[split] = os.path.join(out_dir, f"{split}_prompts.jsonl")
        comparisons[split] = comps
    report["seconds"] = round(time.time() - t0, 3)
    report_path = os.path.join(out_dir, "report.json")
    write_json_atomic(report_path, report)
    _log_summary(report)
    # HH has no validation split: NeMo's configs point validation at test, and so do we
    for d in (prefixes, prompts):
        if "validation" not in d and "test" in d:
            d["validation"] = d["test"]
    return {"data_prefix": prefixes, "prompts": prompts, "comparisons": comparisons,
            "tokenizer": tok.path, "report": report_path}


def _log_summary(report: dict) -> None:
    for split, r in report["splits"].items():
        j, m = r["jsonl"], r["mmap"]
        log.info("%s: read %d, kept %d pairs, dropped %s; %d documents, %d tokens (p50 %s, max %s)",
                 split, j["records_read"], j["pairs_kept"], j["dropped"]["by_reason"] or "none",
                 m.get("documents", 0), m.get("tokens", 0), m.get("p50"), m.get("max"))
