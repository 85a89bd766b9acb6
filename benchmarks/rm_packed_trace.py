"""Diagnosis of packed (varlen) reward-model training on the GPU: before each optimizer step, the
same global batch's rewards are computed padded and packed (no grad, and packed with grad on), so
a divergence between what the packed trainer optimises and what the padded model computes shows
up at the step where it starts. GPT-2B-001 architecture, random weights, HH lengths, bf16.

    python3 benchmarks/rm_packed_trace.py --out trace.json [--eager] [--steps 12]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rm_throughput import synthetic_pairs  # noqa: E402
from modeling import RewardModel, presets  # noqa: E402
from modeling.layers import init_weights, pack_documents  # noqa: E402
from rm_training.data import PairDataset, collate, collate_packed, packed_micro_batches  # noqa: E402
from rm_training.loss import bradley_terry_loss, split_rewards  # noqa: E402
from rm_training.trainer import LoopSettings, RMTrainer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="trace.json")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--lr", type=float, default=9e-6)
    args = ap.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    lengths = json.load(open(os.path.join(here, "rm", "hh_lengths.json")))["pairs"]
    cfg = presets.gpt_2b_001()
    cfg.num_layers = args.layers
    cfg.torch_compile = not args.eager
    vocab = cfg.padded_vocab_size(256000)
    os.makedirs("/tmp/rm_trace", exist_ok=True)
    ds = PairDataset([synthetic_pairs("/tmp/rm_trace/hh", lengths, 256000)], 4096, "truncate", 1234, "train")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = RewardModel(cfg, vocab, with_lm_head=False)
    init_weights(model, cfg)
    optim = {"name": "adamw", "lr": args.lr, "weight_decay": 0.1, "betas": [0.9, 0.98],
             "sched": {"name": "CosineAnnealing", "warmup_steps": 2, "constant_steps": 1000, "min_lr": args.lr / 10}}
    st = LoopSettings(global_batch_size=64, micro_batch_size=64, length_grouping_window=64, seed=1234, max_steps=1000,
                      gradient_clip_val=1.0, autocast_dtype=torch.bfloat16, packing=True, packed_tokens=16384,
                      packed_attention="varlen")
    tr = RMTrainer(model, optim, st, ds, None, 0, "/tmp/rm_trace/run", torch.device("cuda"))
    tr.ckpt = None
    rows = []
    for s in range(args.steps):
        gb = tr.global_batch(s)
        mbs = packed_micro_batches(gb, ds.pair_tokens, 1, 0, st.packed_tokens)
        model.train()
        rec = {"step": s, "micro_batches": [len(m) for m in mbs]}
        pad_l, pk_l, pkg_l, diffs = [], [], [], []
        for idx in mbs:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                with torch.no_grad():
                    pb = collate(ds, idx, 0, 8).to(torch.device("cuda"))
                    rp = model(pb.input_ids, lengths=pb.lengths).float()
                    kb = collate_packed(ds, idx, 0, 128).to(torch.device("cuda"))
                    docs = pack_documents(kb.doc_lengths, tuple(kb.input_ids.shape), "varlen", "cuda", real=2 * kb.pairs)
                    rk = model(kb.input_ids, documents=docs).float()
                rkg = model(kb.input_ids, documents=docs).float().detach()  # grad on, as in training
            for r, acc in ((rp, pad_l), (rk, pk_l), (rkg, pkg_l)):
                c, j = split_rewards(r)
                acc.extend(bradley_terry_loss(c, j).tolist())
            d = (rk - rp).abs()
            diffs.append({"max_abs": float(d.max()), "argmax_doc": int(d.argmax()), "n_docs": int(rp.numel()),
                          "width": int(kb.input_ids.shape[1]), "max_len": int(docs.max_len),
                          "doc_lengths_head": kb.doc_lengths[:6].tolist(),
                          "gdiff_max_abs": float((rkg - rp).abs().max())})
        m = tr.train_step(s)
        rec.update(train_loss=m["loss"], padded_loss=float(np.mean(pad_l)), packed_nograd_loss=float(np.mean(pk_l)),
                   packed_grad_loss=float(np.mean(pkg_l)), diffs=diffs, grad_norm=m["grad_norm"])
        print(json.dumps(rec), flush=True)
        rows.append(rec)
        json.dump({"args": vars(args), "rows": rows}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
