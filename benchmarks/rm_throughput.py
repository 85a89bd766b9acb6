"""Reward-model training throughput, GPT-2B-001 architecture (random weights, 256k vocab), bf16, one
GPU, on HH's real pair-length distribution (benchmarks/rm/hh_lengths.json, random token ids):

  ours    the rm stage's RMTrainer.train_step: length-grouped global batches of 64 pairs, micro-batches
          padded to their longest member (split above --max-tokens padded tokens), eager (and
          --compile: torch.compile per layer)
  padded  (a) NeMo-Aligner's batching with the same model code: every sequence padded to 4096,
          micro_batch_size 2
  trl     (b) benchmarks/rm_trl_baseline.py in a subprocess: TRL's RewardTrainer on a transformers Llama
          of the same size
  packed  --packed BACKEND:TOKENS:WINDOW,...: sequence packing (rm.model.data.packing=true), compiled:
          a step's pairs laid end to end in micro-batches of <= TOKENS tokens, block-diagonal causal
          attention through BACKEND (varlen = flash varlen kernel, flex = FlexAttention)
  check   --check: packed vs padded rewards of the same pairs, bf16 on the GPU, eager

MFU counts real tokens only: sum over real sequences of len * modeling.flops_per_token(cfg, len,
lm_head=False) per second, over the H100's 989 TFLOP/s dense bf16 peak.

    python benchmarks/rm_throughput.py --out results.json [--compile] [--trl]
    python benchmarks/rm_throughput.py --out packed.json --skip-eager --skip-padded --compile --window 64 \
        --check --packed varlen:16384:64,flex:16384:64
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep.indexed import MMapIndexedWriter  # noqa: E402
from modeling import RewardModel, flops_per_token, presets  # noqa: E402
from modeling.layers import init_weights  # noqa: E402
from rm_training.data import PairDataset  # noqa: E402
from rm_training.trainer import LoopSettings, RMTrainer  # noqa: E402

PEAK = 989.4e12  # H100 SXM dense bf16
HERE = os.path.dirname(os.path.abspath(__file__))


def synthetic_pairs(path: str, lengths, vocab: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    w = MMapIndexedWriter(path, np.int32)
    for lc, lr in lengths:
        w.add_document(rng.integers(0, vocab, lc))
        w.add_document(rng.integers(0, vocab, lr))
    w.finish()
    return path


def real_flops(cfg, ds: PairDataset, indices) -> float:
    total = 0.0
    for k in indices:
        for seq in ds.pair(int(k)):
            total += len(seq) * flops_per_token(cfg, len(seq), lm_head=False)
    return total


def check_packed(model, ds, backends, n_pairs=48, seed=0):
    """Rewards of the same pairs, padded (one micro-batch) vs packed, bf16 autocast, eager, no grad."""
    from modeling.layers import pack_documents
    from rm_training.data import collate, collate_packed

    idx = np.random.default_rng(seed).permutation(len(ds))[:n_pairs]
    model.eval()
    out = {}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        pb = collate(ds, idx, 0, 8).to(torch.device("cuda"))
        ref = model(pb.input_ids, lengths=pb.lengths).float()
        with torch.autocast("cuda", enabled=False):  # fp32 weights: the fp32 reference
            ref32 = model(pb.input_ids, lengths=pb.lengths).float()
        for be in backends:
            try:
                kb = collate_packed(ds, idx, 0, 128).to(torch.device("cuda"))
                docs = pack_documents(kb.doc_lengths, tuple(kb.input_ids.shape), be, "cuda", real=2 * kb.pairs)
                got = model(kb.input_ids, documents=docs).float()
                out[be] = {"rel_err_vs_padded_bf16": float((got - ref).norm() / ref.norm()),
                           "rel_err_vs_padded_fp32": float((got - ref32).norm() / ref32.norm()),
                           "padded_bf16_rel_err_vs_fp32": float((ref - ref32).norm() / ref32.norm()),
                           "max_abs_diff_bf16": float((got - ref).abs().max()), "pairs": int(n_pairs),
                           "reward_std": float(ref.std())}
            except Exception as e:  # noqa: BLE001 - report and go on
                out[be] = {"error": repr(e)[-1500:]}
            print(json.dumps({"check": be, **out[be]}), flush=True)
    model.train()
    return out


def check_compiled_training(model, ds, n_pairs=32, seeds=(1, 2)):
    """Packed varlen vs padded in the training setting (train mode, grads on, bf16 autocast): rewards,
    loss and gradients of the same pairs, with the blocks eager and compiled. Two different pair
    sets per mode, so a compiled graph that kept the first batch's documents would show."""
    from modeling.layers import pack_documents
    from rm_training.data import collate, collate_packed
    from rm_training.loss import bradley_terry_loss, split_rewards

    params = [p for n, p in model.named_parameters() if p.requires_grad]
    def run(packed, idx):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if packed:
                kb = collate_packed(ds, idx, 0, 128).to(torch.device("cuda"))
                docs = pack_documents(kb.doc_lengths, tuple(kb.input_ids.shape), "varlen", "cuda", real=2 * kb.pairs)
                r = model(kb.input_ids, documents=docs).float()
            else:
                pb = collate(ds, idx, 0, 8).to(torch.device("cuda"))
                r = model(pb.input_ids, lengths=pb.lengths).float()
        c, rj = split_rewards(r)
        loss = bradley_terry_loss(c, rj).mean()
        loss.backward()
        g = torch.cat([p.grad.float().flatten() for p in params if p.grad is not None])
        model.zero_grad(set_to_none=True)
        return r.detach(), float(loss), g
    model.train()
    refs = {}
    model.config.torch_compile, model._compiled_layers = False, None
    for sd in seeds:
        refs[sd] = run(False, np.random.default_rng(sd).permutation(len(ds))[:n_pairs])
    out = {}
    for mode in ("eager", "compiled"):
        model.config.torch_compile, model._compiled_layers = mode != "eager", None
        torch._dynamo.reset()
        rows = []
        try:
            for sd in seeds:
                r0, l0, g0 = refs[sd]
                r, l, g = run(True, np.random.default_rng(sd).permutation(len(ds))[:n_pairs])
                rows.append({"seed": sd, "reward_rel_err": float((r - r0).norm() / r0.norm()), "loss_padded": l0,
                             "loss_packed": l, "grad_rel_err": float((g - g0).norm() / g0.norm())})
        except Exception as e:  # noqa: BLE001 - report and go on
            rows.append({"error": repr(e)[-1500:]})
        out[mode] = rows
        print(json.dumps({"check_training": mode, "rows": rows}), flush=True)
    model.config.torch_compile, model._compiled_layers = False, None
    torch._dynamo.reset()
    return out


def profile_steps(tr, first: int, n: int) -> dict:
    """n more optimizer steps under torch.profiler: wall time against the GPU's kernel time (how
    much of a step the GPU idles: launch/Python/sync overhead) and the top kernels by GPU time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for s in range(first, first + n):
            tr.train_step(s)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    gpu_us = sum(getattr(e, attr) for e in events)
    top = sorted(events, key=lambda e: -getattr(e, attr))[:25]
    rows = [{"name": e.key[:90], "gpu_ms": round(getattr(e, attr) / 1e3, 2), "calls": e.count} for e in top]
    out = {"steps": n, "wall_s": wall, "gpu_kernel_s": gpu_us / 1e6, "gpu_busy_fraction": gpu_us / 1e6 / wall, "top": rows}
    print(json.dumps({"profile": {k: v for k, v in out.items() if k != "top"}}), flush=True)
    for r in rows:
        print(f"  {r['gpu_ms']:9.2f} ms  {r['calls']:6d}  {r['name']}", flush=True)
    return out


def measure(name, model, cfg, ds, settings, warmup, steps, optim_cfg, device="cuda", profile=0):
    # every run starts from the same initial weights: the runs draw the same global batches (same
    # seed), and a model that had trained on them in an earlier run would have memorised them (an
    # earlier version of this script reported packed losses of 0.001 on random labels that way)
    torch.manual_seed(0)
    init_weights(model, cfg)
    tr = RMTrainer(model, optim_cfg, settings, ds, None, 0, "/tmp/rm_bench_" + name, torch.device(device))
    tr.ckpt = None
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    for s in range(warmup):
        tr.train_step(s)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    pairs = real = padded = mbs_count = 0
    flops = 0.0
    losses = []
    count = tr._collate
    def counting(ds_, idx):
        nonlocal mbs_count
        mbs_count += 1
        return count(ds_, idx)
    tr._collate = counting
    for s in range(warmup, warmup + steps):
        m = tr.train_step(s)
        losses.append(m["loss"])
        pairs += m["pairs"]
        real += m["tokens"]
        padded += int(m["tokens"] / m["padding_efficiency"])
        flops += real_flops(cfg, ds, tr.global_batch(s))
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    res = {"name": name, "pairs_per_s": pairs / dt, "real_tokens_per_s": real / dt, "padded_tokens_per_s": padded / dt,
           "padding_efficiency": real / padded, "mfu_real": flops / dt / PEAK, "seconds": dt, "steps": steps,
           "pairs": pairs, "global_batch_size": settings.global_batch_size, "micro_batch_size": settings.micro_batch_size,
           "max_micro_batch_tokens": settings.max_micro_batch_tokens, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
           "loss_last": m["loss"], "losses": losses, "micro_batches_per_step": mbs_count / steps}
    if profile:
        res["profile"] = profile_steps(tr, warmup + steps, profile)
    print(json.dumps(res), flush=True)
    del tr
    torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default=os.path.join(HERE, "rm", "hh_lengths.json"))
    ap.add_argument("--out", default="rm_throughput.json")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--gbs", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--trl", action="store_true")
    ap.add_argument("--skip-padded", action="store_true")
    ap.add_argument("--window", type=int, default=16, help="length_grouping_window (global batches)")
    ap.add_argument("--skip-eager", action="store_true")
    ap.add_argument("--padded-compile", action="store_true", help="also run (a) pad-to-4096 compiled")
    ap.add_argument("--check", action="store_true", help="packed vs padded rewards on the GPU (bf16)")
    ap.add_argument("--warmup", type=int, default=6, help="untimed steps before timing (compiled runs)")
    ap.add_argument("--profile", type=int, default=0, help="profile this many extra steps of the compiled run")
    ap.add_argument("--packed", default="", help="BACKEND:TOKENS:WINDOW[:MEMORY_BUDGET],... packed runs (compiled; "
                    "MEMORY_BUDGET: torch._functorch.config.activation_memory_budget, default 1)")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    lengths = json.load(open(args.lengths))["pairs"]
    cfg = presets.gpt_2b_001()
    vocab = cfg.padded_vocab_size(256000)
    os.makedirs("/tmp/rm_bench", exist_ok=True)
    prefix = synthetic_pairs("/tmp/rm_bench/hh_lengths", lengths, 256000)
    ds = PairDataset([prefix], 4096, "truncate", 1234, "train")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = RewardModel(cfg, vocab, with_lm_head=False)
    init_weights(model, cfg)
    optim_cfg = {"name": "adamw", "lr": 9e-6, "weight_decay": 0.1, "betas": [0.9, 0.98],
                 "sched": {"name": "CosineAnnealing", "warmup_steps": 10, "constant_steps": 1000, "min_lr": 9e-7}}
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "params": model.num_parameters(),
            "pairs_in_lengths": len(lengths), "mean_tokens_per_pair": float(np.sum(lengths) / len(lengths))}
    print(json.dumps(info), flush=True)
    results = {"info": info, "runs": []}
    common = dict(seed=1234, max_steps=10_000, gradient_clip_val=1.0, autocast_dtype=torch.bfloat16)
    ours = LoopSettings(global_batch_size=args.gbs, micro_batch_size=args.gbs, length_grouping_window=args.window,
                        max_micro_batch_tokens=args.max_tokens, pad_to_multiple=8, **common)
    if args.check:
        results["check"] = check_packed(model, ds, ["varlen"])
        results["check_training"] = check_compiled_training(model, ds)
        json.dump(results, open(args.out, "w"), indent=1)
    if not args.skip_eager:
        results["runs"].append(measure("ours_eager", model, cfg, ds, ours, 3, args.steps, optim_cfg))
    if not args.skip_padded:
        padded = LoopSettings(global_batch_size=16, micro_batch_size=2, length_grouping_window=0,
                              pad_to_multiple=4096, **common)
        results["runs"].append(measure("a_padded_4096_mbs2", model, cfg, ds, padded, 1, 2, optim_cfg))
        if args.padded_compile:  # (a) with the same compiled blocks as ours: a fixed shape, compiled once
            model.config.torch_compile, model._compiled_layers = True, None
            results["runs"].append(measure("a_padded_4096_mbs2_compiled", model, cfg, ds, padded, 2, 2, optim_cfg))
            model.config.torch_compile, model._compiled_layers = False, None
            torch._dynamo.reset()
    json.dump(results, open(args.out, "w"), indent=1)
    if args.compile:
        model.config.torch_compile = True
        t = time.perf_counter()
        results["runs"].append(measure("ours_compiled", model, cfg, ds, ours, args.warmup, args.steps, optim_cfg,
                                       profile=args.profile))
        results["runs"][-1]["compile_and_warmup_s"] = time.perf_counter() - t - results["runs"][-1]["seconds"]
        json.dump(results, open(args.out, "w"), indent=1)
    for spec in filter(None, args.packed.split(",")):
        backend, tokens, window, *rest = spec.split(":")
        budget = float(rest[0]) if rest else 1.0
        model.config.torch_compile = True
        model._compiled_layers = None
        torch._dynamo.reset()  # each variant compiles on its own (and stays under the recompile limit)
        model.config.activation_memory_budget = budget  # model.activation_memory_budget in the kit's config
        name = f"ours_packed_{backend}_{tokens}_w{window}" + (f"_budget{budget:g}" if rest else "")
        st = LoopSettings(global_batch_size=args.gbs, micro_batch_size=args.gbs, length_grouping_window=int(window),
                          packing=True, packed_tokens=int(tokens), packed_attention=backend, **common)
        t = time.perf_counter()
        try:
            results["runs"].append(measure(name, model, cfg, ds, st, args.warmup, args.steps, optim_cfg, profile=args.profile))
            results["runs"][-1]["compile_and_warmup_s"] = time.perf_counter() - t - results["runs"][-1]["seconds"]
            results["runs"][-1]["packed_attention"] = backend
            results["runs"][-1]["activation_memory_budget"] = budget
        except Exception as e:  # noqa: BLE001 - one variant failing must not lose the others
            import traceback
            traceback.print_exc()
            results["runs"].append({"name": name, "error": repr(e)[-1500:]})
            torch.cuda.empty_cache()
        json.dump(results, open(args.out, "w"), indent=1)
    if args.trl:
        del model
        torch.cuda.empty_cache()
        out = subprocess.run([sys.executable, os.path.join(HERE, "rm_trl_baseline.py"), "--lengths", args.lengths],
                             capture_output=True, text=True, timeout=400)
        print(out.stdout[-3000:], out.stderr[-3000:], flush=True)
        line = [l for l in out.stdout.splitlines() if l.startswith("{") and "trl" in l]
        results["runs"].append(json.loads(line[-1]) if line else {"name": "b_trl", "error": out.stderr[-1500:]})
    base = results["runs"][0].get("pairs_per_s", float("nan"))
    best = max(r.get("pairs_per_s", 0) for r in results["runs"] if r["name"].startswith("ours"))
    for r in results["runs"]:
        if r.get("pairs_per_s"):
            r["ours_best_speedup_vs_this"] = best / r["pairs_per_s"]
    json.dump(results, open(args.out, "w"), indent=1)
    print("\n| run | pairs/s | real tok/s | useful MFU | padding eff. | peak GiB |\n|---|---|---|---|---|---|")
    for r in results["runs"]:
        if "pairs_per_s" in r:
            print(f"| {r['name']} | {r['pairs_per_s']:.1f} | {r['real_tokens_per_s']:.0f} | {100 * r['mfu_real']:.1f}% | "
                  f"{r.get('padding_efficiency', float('nan')):.2f} | {r.get('peak_mem_gib', float('nan')):.1f} |")
        else:
            print(f"| {r['name']} | failed | | | | |")
    print("ours eager", base, "best", best)


if __name__ == "__main__":
    main()
