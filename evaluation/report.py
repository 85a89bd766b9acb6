"""The eval stage's picture and table: per-subset accuracy (with its interval and the length
baseline beside it) and the reward histograms of chosen and rejected responses."""
from __future__ import annotations

from typing import Dict

import numpy as np

from engine.io import atomic_write


def table(results: Dict[str, dict]) -> str:
    head = f"{'subset':<28}{'pairs':>7}{'accuracy':>10}{'95% CI':>17}{'margin':>9}{'longer wins':>13}"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        lo, hi = r["accuracy_ci95"]
        lines.append(f"{name[:27]:<28}{r['pairs']:>7}{r['accuracy']:>10.3f}{f'[{lo:.3f}, {hi:.3f}]':>17}"
                     f"{r['mean_margin']:>9.3f}{r['longer_wins_accuracy']:>13.3f}")
    return "\n".join(lines)


def plot(results: Dict[str, dict], chosen: np.ndarray, rejected: np.ndarray, path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = list(results)
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(9, 4 + 1.1 * len(names)), 3.8))
    x = np.arange(len(names))
    acc = np.array([results[n]["accuracy"] for n in names])
    ci = np.array([results[n]["accuracy_ci95"] for n in names])
    a.bar(x - 0.2, acc, 0.4, yerr=[acc - ci[:, 0], ci[:, 1] - acc], capsize=3, label="reward model")
    a.bar(x + 0.2, [results[n]["longer_wins_accuracy"] for n in names], 0.4, label="longer response wins", alpha=0.6)
    a.axhline(0.5, color="grey", lw=0.8, ls="--")
    a.set_xticks(x, names, rotation=30 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center")
    a.set_ylim(0, 1)
    a.set_ylabel("accuracy (95% CI)")
    a.legend(fontsize=8)
    a.grid(axis="y", alpha=0.3)
    bins = np.histogram_bin_edges(np.concatenate([chosen, rejected]) if len(chosen) else [0, 1], bins=40)
    b.hist(chosen, bins, alpha=0.6, label="chosen")
    b.hist(rejected, bins, alpha=0.6, label="rejected")
    b.set_xlabel("reward")
    b.legend(fontsize=8)
    b.set_title("rewards")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
