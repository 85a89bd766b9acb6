"""Reward-model evaluation: load the reward model and its own tokenizer, read the preference set,
score every sequence (length-sorted micro-batches, right padding: no mask needed), and write
rm_metrics.json, rm_rewards.jsonl (one line per pair) and rm_eval.png; the table goes to the log."""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Dict, List

import numpy as np
import torch

from data_prep.hh import prompt_format as hh_prompt_format
from data_prep.report import DropLog
from engine.io import atomic_write, write_json

from .config import RewardEvalConfig
from .metrics import by_subset
from .preferences import Pair, load_pairs
from .report import plot, table

log = logging.getLogger(__name__)


def has_reward_head(path: str) -> bool:
    """A checkpoint with a trained head (a fresh random one would score noise)."""
    from modeling.checkpoint import resolve_path
    from modeling.formats import detect_format
    from modeling.nemo_io import NemoArchive

    path = resolve_path(path)
    fmt = detect_format(path)
    if fmt in ("nemo", "nemo_dir"):
        with NemoArchive(path) as a:
            return any(k.endswith("rm_head.weight") for k in a.load_weights(shapes_only=True))
    if fmt == "hf":
        with open(os.path.join(path, "config.json")) as f:
            return any(a.endswith(("ForSequenceClassification", "ForTokenClassification"))
                       for a in json.load(f).get("architectures") or [])
    return False


def reward_tokenizer(path: str, stage_dir: str):
    """The tokenizer inside the reward model's .nemo (or beside an HF export): what it was trained with."""
    from data_prep.tokenizers import load_tokenizer
    from modeling.checkpoint import resolve_path

    path = resolve_path(path)
    library = "nemo" if not os.path.isfile(os.path.join(path, "tokenizer.json")) else None
    return load_tokenizer(path, library, extract_dir=os.path.join(stage_dir, "tokenizer"))


def _lines(by_source: Dict[str, List[int]], show: int = 5) -> str:
    return ", ".join(f"{src} line{'s' if len(ls) > 1 else ''} {', '.join(map(str, ls[:show]))}{', ...' if len(ls) > show else ''}"
                     for src, ls in by_source.items())


@torch.no_grad()
def score(model, seqs: List[List[int]], micro_batch_size: int, pad_id: int, device, amp) -> np.ndarray:
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = np.empty(len(seqs), dtype=np.float64)
    for s in range(0, len(order), micro_batch_size):
        idx = order[s: s + micro_batch_size]
        width = len(seqs[idx[-1]])
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
        lengths = torch.tensor([len(seqs[i]) for i in idx])
        with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
            r = model(ids.to(device), lengths=lengths.to(device))
        out[idx] = r.float().cpu().numpy()
    return out


@torch.no_grad()
def score_packed(model, seqs: List[List[int]], packed_tokens: int, pad_id: int, device, amp,
                 backend: str = "auto") -> np.ndarray:
    """Rewards of `seqs` scored packed: laid end to end into rows of at most `packed_tokens` tokens as the
    training stages pack (engine.packing; a longer sequence gets a row of its own), each row one forward
    with block-diagonal causal attention and the reward read at each sequence's last token."""
    from engine.packing import pack_balanced
    from modeling.layers import pack_documents

    rows = [r.tolist() for r in pack_balanced(np.arange(len(seqs)), np.array([len(s) for s in seqs]), packed_tokens)]
    out = np.empty(len(seqs), dtype=np.float64)
    for row in rows:
        lens = [len(seqs[i]) for i in row]
        real = sum(lens)
        width = -(-real // 128) * 128
        ids = torch.full((1, width), pad_id, dtype=torch.long)
        ids[0, :real] = torch.tensor([t for i in row for t in seqs[i]])
        docs = pack_documents(torch.tensor(lens + ([width - real] if width > real else [])), (1, width), backend,
                              device, real=len(row))
        with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
            r = model(ids.to(device), documents=docs)
        out[row] = r.float().cpu().numpy()
    return out


def evaluate_reward_model(ev: RewardEvalConfig, stage_dir: str, prompt_format: str = "nemo") -> Dict[str, str]:
    from modeling import compute_dtype, load_pretrained

    os.makedirs(stage_dir, exist_ok=True)
    if not ev.restore_from_path:
        raise ValueError("eval.rm.restore_from_path: set it, or run stage rm first (its .nemo is used)")
    data = ev.data
    if not data:
        prefix = ev.data_prefix or {}
        data = prefix.get(ev.split) if isinstance(prefix, dict) else prefix
        data = data[0] if isinstance(data, (list, tuple)) else data
        if not data:
            raise ValueError(f"eval.rm.data: set a preference file, or run stage prep first (its {ev.split} split is used)")
    if not has_reward_head(ev.restore_from_path):
        raise ValueError(f"{ev.restore_from_path}: no reward head (model.rm_head.*); evaluate a trained reward model")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if ev.packing not in ("auto", "true", "false", True, False):
        raise ValueError(f"eval.rm.packing={ev.packing!r}: expected auto | true | false")
    packed = device.type == "cuda" if ev.packing == "auto" else ev.packing in ("true", True)
    model = load_pretrained(ev.restore_from_path, head="reward", dtype=torch.float32, device=device)
    amp = compute_dtype(model.config, device) if ev.precision == "bf16" else torch.float32
    if amp != torch.float32:  # scoring only: bf16 weights, no per-matmul cast of fp32 ones (the head stays fp32)
        model = model.to(amp)
    model = model.eval()
    amp = amp if amp != torch.float32 else None
    tok = reward_tokenizer(ev.restore_from_path, stage_dir)
    seq_length = ev.seq_length or model.config.encoder_seq_length
    drops = DropLog()
    pairs: List[Pair] = load_pairs(str(data), tok, seq_length, drops, ev.template, ev.max_pairs,
                                   hh_prompt_format(prompt_format))
    if not pairs:
        raise ValueError(f"{data}: no usable pairs ({drops.to_dict()['by_reason']})")
    t0 = time.perf_counter()
    seqs = [s for p in pairs for s in (p.chosen, p.rejected)]
    if packed:
        r = score_packed(model, seqs, ev.packed_tokens, tok.pad_id, device, amp)
    else:
        r = score(model, seqs, ev.micro_batch_size, tok.pad_id, device, amp)
    elapsed = time.perf_counter() - t0
    chosen, rejected = r[0::2], r[1::2]
    len_c = np.array([len(p.chosen) for p in pairs])
    len_r = np.array([len(p.rejected) for p in pairs])
    results = by_subset([p.subset for p in pairs], chosen, rejected, len_c, len_r, ev.bootstrap_samples, ev.seed)
    rewards_path = os.path.join(stage_dir, "rm_rewards.jsonl")
    with atomic_write(rewards_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for p, c, j in zip(pairs, chosen, rejected):
            f.write(json.dumps({"source": p.source, "line": p.line, "subset": p.subset, "reward_chosen": round(float(c), 6),
                                "reward_rejected": round(float(j), 6), "margin": round(float(c - j), 6),
                                "correct": bool(c > j), "tokens_chosen": len(p.chosen),
                                "tokens_rejected": len(p.rejected)}) + "\n")
    metrics = {"reward_model": ev.restore_from_path, "data": str(data), "seq_length": seq_length, "results": results,
               "rewards": {"chosen_mean": float(chosen.mean()), "chosen_std": float(chosen.std()),
                           "rejected_mean": float(rejected.mean()), "rejected_std": float(rejected.std())},
               "skipped": drops.to_dict(), "pairs_per_s": round(len(pairs) / max(elapsed, 1e-9), 2),
               "device": str(device), "packed": packed}
    metrics_path = os.path.join(stage_dir, "rm_metrics.json")
    write_json(metrics_path, metrics)
    plot_path = plot(results, chosen, rejected, os.path.join(stage_dir, "rm_eval.png"),
                     f"{os.path.basename(str(ev.restore_from_path))} on {os.path.basename(str(data))}")
    skipped = "; ".join(f"{k} {v} ({_lines(drops.where[k])})" for k, v in drops.counts.items()) or "none"
    log.info("reward model %s on %s: %d pairs scored (%.1f pairs/s on %s); skipped: %s\n%s",
             ev.restore_from_path, data, len(pairs), metrics["pairs_per_s"], device, skipped, table(results))
    return {"rm_metrics": metrics_path, "rm_rewards": rewards_path, "rm_plot": plot_path}
