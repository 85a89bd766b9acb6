"""Compare two rm metrics.jsonl curves (1 process vs N processes, same global batch and seed) and
report throughput; or (--ppo) print a ppo run's step-time split.

    python benchmarks/multi_gpu_compare.py rm_1gpu.jsonl rm_2gpu.jsonl [--warmup 10] [--gpus 2]
    python benchmarks/multi_gpu_compare.py --ppo ppo_2gpu.jsonl

Throughput excludes the first `--warmup` steps (torch.compile's first compilations, and the
recompilation for dynamic shapes, land there): pairs/s = sum(pairs) / sum(step_time) over the
remaining steps, step_time being the wall time of an optimizer step as the trainer measures it
(rank 0; all ranks meet in the gradient all-reduce, so it is the step time of the slowest rank).
Scaling efficiency = N-GPU pairs/s / (N x 1-GPU pairs/s).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys


def rows(path, split="train"):
    out = []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r.get("split") == split:
                out.append(r)
    return out


def timed_steps(train, warmup):
    """The steps after the first `warmup` (at least the last one)."""
    return [r for r in train if r["step"] > min(warmup, len(train) - 1)]


def throughput(train, warmup):
    timed = timed_steps(train, warmup)
    pairs = sum(r["pairs"] for r in timed)
    secs = sum(r["step_time"] for r in timed)
    tokens = sum(r["tokens"] for r in timed)
    return pairs / secs, tokens / secs, len(timed), statistics.median(r["step_time"] for r in timed)


def step_fit(train, warmup):
    """Least-squares step_time = fixed + tokens / rate over the timed steps: what a step costs
    whatever its size (fixed, s) and the marginal real tokens/s. None with fewer than 3 steps."""
    timed = timed_steps(train, warmup)
    if len(timed) < 3:
        return None
    xs, ys = [r["tokens"] for r in timed], [r["step_time"] for r in timed]
    if len(set(xs)) < 2:
        return None
    slope, fixed = statistics.linear_regression(xs, ys)
    rms = statistics.mean((fixed + slope * x - y) ** 2 for x, y in zip(xs, ys)) ** 0.5
    return fixed, (1 / slope if slope > 0 else float("inf")), rms


def compare_rm(a_path, b_path, warmup, gpus):
    a, b = rows(a_path), rows(b_path)
    n = min(len(a), len(b))
    print(f"rm curves: {len(a)} vs {len(b)} train steps")
    print(f"{'step':>4} {'loss_1':>9} {'loss_N':>9} {'|dloss|':>9} {'acc_1':>6} {'acc_N':>6} {'pairs':>5} {'t_1 s':>7} {'t_N s':>7}")
    dl, dacc, same_pairs = [], [], True
    for x, y in zip(a[:n], b[:n]):
        d = abs(x["loss"] - y["loss"])
        dl.append(d)
        dacc.append(abs(x["accuracy"] - y["accuracy"]))
        same_pairs &= x["pairs"] == y["pairs"] and x["tokens"] == y["tokens"]
        print(f"{x['step']:>4} {x['loss']:9.5f} {y['loss']:9.5f} {d:9.2e} {x['accuracy']:6.3f} {y['accuracy']:6.3f} "
              f"{y['pairs']:>5} {x['step_time']:7.3f} {y['step_time']:7.3f}")
    print(f"max |loss_1 - loss_N| per step: {max(dl):.3e} (mean {statistics.mean(dl):.3e}); "
          f"max |acc_1 - acc_N|: {max(dacc):.4f} ({sum(d > 0 for d in dacc)} of {n} steps differ); "
          f"same pairs and tokens every step: {same_pairs}")
    va, vb = rows(a_path, "val"), rows(b_path, "val")
    if va and vb:
        print(f"final validation: loss {va[-1]['loss']:.5f} vs {vb[-1]['loss']:.5f}, "
              f"accuracy {va[-1]['accuracy']:.4f} vs {vb[-1]['accuracy']:.4f}")
    p1, t1, k, m1 = throughput(a, warmup)
    pn, tn, _, mn = throughput(b, warmup)
    print(f"throughput over steps {warmup + 1}..{n} ({k} steps; first {warmup} excluded as warm-up):")
    print(f"  1 GPU : {p1:8.1f} pairs/s {t1:10.0f} real tok/s  median step {m1:.3f} s")
    print(f"  {gpus} GPUs: {pn:8.1f} pairs/s {tn:10.0f} real tok/s  median step {mn:.3f} s")
    print(f"  scaling efficiency = {pn:.1f} / ({gpus} x {p1:.1f}) = {pn / (gpus * p1):.3f}")
    for label, train in (("1 GPU ", a), (f"{gpus} GPUs", b)):
        fit = step_fit(train, warmup)
        if fit:
            print(f"  {label} step time fit: {fit[0]:.3f} s fixed + real tokens / {fit[1] / 1e3:.1f}k tok/s "
                  f"(rms residual {fit[2]:.3f} s)")
    return {"max_abs_dloss": max(dl), "max_abs_dacc": max(dacc), "pairs_per_s_1": p1, "pairs_per_s_n": pn,
            "efficiency": pn / (gpus * p1)}


def ppo_split(path, skip=1):
    train = rows(path)
    keys = ["time_generation", "time_scoring", "time_training", "time_step"]
    print(f"ppo: {len(train)} train steps")
    for r in train:
        print(f"  step {r['step']}: " + ", ".join(f"{k[5:]} {r[k]:.2f} s" for k in keys if k in r)
              + f", gen tok/s {r.get('generation_tokens_per_s', float('nan')):.0f}"
              + f", reward {r.get('rewards', r.get('reward_mean', float('nan')))}")
    timed = train[skip:] or train
    med = {k: statistics.median(r[k] for r in timed) for k in keys if all(k in r for r in timed)}
    if "time_step" in med:
        print(f"  median of steps {timed[0]['step']}..{timed[-1]['step']}: " + ", ".join(
            f"{k[5:]} {v:.2f} s ({100 * v / med['time_step']:.0f}%)" for k, v in med.items()))
    return med


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--ppo", action="store_true", help="print a ppo metrics.jsonl's step-time split")
    ap.add_argument("--warmup", type=int, default=10, help="rm steps left out of throughput")
    ap.add_argument("--gpus", type=int, default=2)
    a = ap.parse_args(argv)
    if a.ppo:
        ppo_split(a.files[0])
    else:
        compare_rm(a.files[0], a.files[1], a.warmup, a.gpus)


if __name__ == "__main__":
    sys.exit(main())
