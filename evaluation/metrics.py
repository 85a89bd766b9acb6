"""Pairwise accuracy with a bootstrap interval, per subset, and the length baseline beside it."""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np


def wins(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 where a > b, 0.5 on a tie, 0 where a < b (a tie is a coin flip, for the model and the baseline alike)."""
    return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))


def bootstrap_ci(x: np.ndarray, samples: int, rng: np.random.Generator, level: float = 0.95):
    """Percentile bootstrap interval of mean(x): pairs resampled with replacement."""
    if len(x) == 0:
        return [float("nan"), float("nan")]
    means = np.empty(samples)
    chunk = max(1, 2_000_000 // len(x))  # bounded memory on large sets
    for s in range(0, samples, chunk):
        k = min(chunk, samples - s)
        means[s: s + k] = x[rng.integers(0, len(x), (k, len(x)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def summarize(chosen: np.ndarray, rejected: np.ndarray, len_c: np.ndarray, len_r: np.ndarray,
              samples: int, rng: np.random.Generator) -> Dict[str, object]:
    correct, longer = wins(chosen, rejected), wins(len_c, len_r)
    margin = chosen - rejected
    return {
        "pairs": int(len(chosen)),
        "accuracy": float(correct.mean()) if len(correct) else float("nan"),
        "accuracy_ci95": bootstrap_ci(correct, samples, rng),
        "mean_margin": float(margin.mean()) if len(margin) else float("nan"),
        "std_margin": float(margin.std()) if len(margin) else float("nan"),
        "longer_wins_accuracy": float(longer.mean()) if len(longer) else float("nan"),
        "longer_wins_ci95": bootstrap_ci(longer, samples, rng),
    }


def by_subset(subsets: Sequence[str], chosen, rejected, len_c, len_r, samples: int, seed: int) -> Dict[str, dict]:
    """{"overall": ..., <subset>: ...} (subsets only when the records name some)."""
    rng = np.random.default_rng(seed)
    subsets = np.asarray(subsets)
    out = {"overall": summarize(chosen, rejected, len_c, len_r, samples, rng)}
    names = sorted(set(subsets.tolist()))
    if names and names != ["all"]:
        for name in names:
            m = subsets == name
            out[name] = summarize(chosen[m], rejected[m], len_c[m], len_r[m], samples, rng)
    return out
