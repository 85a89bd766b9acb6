"""The pairwise Bradley-Terry loss and its metrics.

loss = -log sigmoid(r_chosen - r_rejected), per pair. Rewards come as [c0, r0, c1, r1, ...] (the
micro-batch row order of `data.collate`). Metrics are accumulated as sums (`PairStats`) so that
micro-batches and ranks combine exactly into means and standard deviations of the global batch.
"""
from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F

STAT_KEYS = ("n", "loss", "correct", "rc", "rc2", "rr", "rr2", "margin")


def split_rewards(rewards: torch.Tensor):
    """[2m] interleaved -> (chosen [m], rejected [m])."""
    return rewards[0::2], rewards[1::2]


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair loss [m] = -log sigmoid(chosen - rejected) (softplus form, stable), in fp32."""
    return F.softplus(-(chosen.float() - rejected.float()))


def pair_sums(chosen: torch.Tensor, rejected: torch.Tensor, losses: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Detached sums for the metrics (kept on the device: no sync per micro-batch)."""
    c, r = chosen.detach().double(), rejected.detach().double()
    return {"n": torch.tensor(float(c.numel()), dtype=torch.float64, device=c.device),
            "loss": losses.detach().double().sum(), "correct": (c > r).double().sum(),
            "rc": c.sum(), "rc2": (c * c).sum(), "rr": r.sum(), "rr2": (r * r).sum(), "margin": (c - r).sum()}


class PairStats:
    """Running sums over micro-batches; `finish()` -> the metric dict (after an all-reduce)."""

    def __init__(self, device=None):
        self.device = device
        self.sums = None

    def add(self, sums: Dict[str, torch.Tensor]) -> None:
        if self.sums is None:
            self.sums = {k: v.clone() for k, v in sums.items()}
        else:
            for k in STAT_KEYS:
                self.sums[k] += sums[k]

    def vector(self) -> torch.Tensor:
        if self.sums is None:
            return torch.zeros(len(STAT_KEYS), dtype=torch.float64, device=self.device)
        return torch.stack([self.sums[k] for k in STAT_KEYS])

    @staticmethod
    def metrics(vec) -> Dict[str, float]:
        s = dict(zip(STAT_KEYS, [float(x) for x in vec]))
        n = max(s["n"], 1.0)
        def std(total, sq):
            mean = total / n
            return math.sqrt(max(sq / n - mean * mean, 0.0))
        return {"loss": s["loss"] / n, "accuracy": s["correct"] / n,
                "chosen_reward_mean": s["rc"] / n, "chosen_reward_std": std(s["rc"], s["rc2"]),
                "rejected_reward_mean": s["rr"] / n, "rejected_reward_std": std(s["rr"], s["rr2"]),
                "margin": s["margin"] / n, "pairs": int(s["n"])}
