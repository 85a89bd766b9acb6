"""DPO and its NeMo-Aligner variants, on per-sequence log-probability ratios.

For a pair, c = log pi(chosen | prompt) - log pi_ref(chosen | prompt) and r the same for the rejected
response (sums over the response tokens, or means with `preference_average_log_probs`); beta is
`ref_policy_kl_penalty`; delta = c - r. As NeMo-Aligner's megatron_gpt_dpo_model.py:

  dpo        -log sigmoid(beta * delta)
  ipo        (delta - 1 / (2 beta))^2                       (Azar et al. 2023; delta unscaled)
  rpo_sq     (beta * delta - s (g_c - g_r))^2                g: the pair's rewards, s: gt_reward_scale
  rpo_bwd_kl KL(alpha || beta_hat) of the two-point distributions sigmoid(+-s (g_c - g_r)) and
  rpo_fwd_kl sigmoid(+-beta delta) (backward), or KL(beta_hat || alpha) (forward)

The reference-free variant (`reference_free`, TRL's key: NeMo-Aligner has none) takes log pi_ref = 0.
The implicit reward of a response is beta * (its log ratio); `accuracy` is the share of pairs whose
chosen response has the larger one, `margin` the mean of beta * delta.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F

PREFERENCE_LOSSES = ("dpo", "ipo", "rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl")
STAT_KEYS = ("n", "loss", "preference_loss", "sft_loss", "correct", "rc", "rc2", "rr", "rr2", "margin")


def sequence_logps(token_logps: torch.Tensor, seq_index: torch.Tensor, n_seqs: int,
                   average: bool = False) -> torch.Tensor:
    """Per-sequence sums (or means) of token log-probs: token_logps [N], seq_index [N] in 0..n_seqs-1."""
    sums = torch.zeros(n_seqs, dtype=torch.float32, device=token_logps.device)
    sums = sums.index_add(0, seq_index, token_logps.float())
    if not average:
        return sums
    counts = torch.zeros(n_seqs, dtype=torch.float32, device=token_logps.device)
    counts = counts.index_add(0, seq_index, torch.ones_like(token_logps, dtype=torch.float32))
    return sums / counts.clamp(min=1)


def preference_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, kind: str = "dpo",
                    gt_chosen: Optional[torch.Tensor] = None, gt_rejected: Optional[torch.Tensor] = None,
                    gt_reward_scale: float = 1.0) -> torch.Tensor:
    """Per-pair loss [m] from the chosen and rejected log ratios [m] (policy minus reference)."""
    delta = chosen.float() - rejected.float()
    if kind == "dpo":
        return F.softplus(-beta * delta)  # = -log sigmoid(beta * delta), stable
    if kind == "ipo":
        return (delta - 1.0 / (2.0 * beta)) ** 2
    if kind not in PREFERENCE_LOSSES:
        raise ValueError(f"preference_loss={kind!r}: expected one of {', '.join(PREFERENCE_LOSSES)}")
    if gt_chosen is None or gt_rejected is None:
        raise ValueError(f"preference_loss={kind} needs the pairs' rewards (data.default_chosen_reward ...)")
    gt = gt_reward_scale * (gt_chosen.float() - gt_rejected.float())
    if kind == "rpo_sq":
        return (beta * delta - gt) ** 2
    log_b = F.logsigmoid(beta * delta), F.logsigmoid(-beta * delta)
    log_a = F.logsigmoid(gt), F.logsigmoid(-gt)
    if kind == "rpo_bwd_kl":
        return sum(la.exp() * (la - lb) for la, lb in zip(log_a, log_b))
    return sum(lb.exp() * (lb - la) for la, lb in zip(log_a, log_b))  # rpo_fwd_kl


def pair_sums(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, losses: torch.Tensor,
              pref: torch.Tensor, sft: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Detached sums over a micro-batch's pairs, combined exactly over micro-batches and ranks.
    chosen / rejected: log ratios; the statistics are of the implicit rewards beta * ratio."""
    c, r = beta * chosen.detach().double(), beta * rejected.detach().double()
    d = lambda t: t.detach().double().sum()  # noqa: E731
    return {"n": torch.tensor(float(c.numel()), dtype=torch.float64, device=c.device), "loss": d(losses),
            "preference_loss": d(pref), "sft_loss": d(sft), "correct": (chosen.detach() > rejected.detach()).double().sum(),
            "rc": c.sum(), "rc2": (c * c).sum(), "rr": r.sum(), "rr2": (r * r).sum(), "margin": (c - r).sum()}


def metrics(vec) -> Dict[str, float]:
    """The summed statistics (STAT_KEYS order) -> means and standard deviations."""
    s = dict(zip(STAT_KEYS, [float(x) for x in vec]))
    n = max(s["n"], 1.0)

    def std(total, sq):
        mean = total / n
        return math.sqrt(max(sq / n - mean * mean, 0.0))
    return {"loss": s["loss"] / n, "preference_loss": s["preference_loss"] / n, "sft_loss": s["sft_loss"] / n,
            "accuracy": s["correct"] / n, "implicit_reward_chosen": s["rc"] / n,
            "implicit_reward_chosen_std": std(s["rc"], s["rc2"]), "implicit_reward_rejected": s["rr"] / n,
            "implicit_reward_rejected_std": std(s["rr"], s["rr2"]), "margin": s["margin"] / n, "pairs": int(s["n"])}
