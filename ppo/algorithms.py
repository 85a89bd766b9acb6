"""PPO math, as NeMo-Aligner computes it: per-token KL penalty, GAE, clipped policy and value losses.

Layout: per-token tensors are [B, T] where column t is the action "emit token t+1 given tokens
0..t" (so T = sequence length - 1). `mask` is 1 on response tokens and 0 on prompt and padding.
Every reduction is a masked mean over the mask, optionally summed across data-parallel ranks
(`group` is anything with `all_reduce(tensor)` that sums in place; None = one process).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


def _sum(t: torch.Tensor, reducer=None) -> torch.Tensor:
    if reducer is not None:
        reducer(t)
    return t


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor, reducer=None) -> torch.Tensor:
    """Mean of x where mask is 1 (over all ranks when `reducer` sums across them)."""
    if reducer is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    s = _sum(torch.stack([(x * mask).sum().detach().float(), mask.sum().float()]), reducer)
    return s[0] / s[1].clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, reducer=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased variance) of x where mask is 1."""
    x, mask = x.detach().float(), mask.float()
    s = _sum(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]), reducer)
    n = s[2].clamp(min=1)
    mean = s[0] / n
    var = (s[1] / n - mean * mean).clamp(min=0)
    return mean, var * n / (n - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, reducer=None, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; zero elsewhere (advantage normalization)."""
    mean, var = masked_var(x, mask, reducer)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, use_absolute_kl: bool) -> torch.Tensor:
    """NeMo-Aligner's KL estimate per token: log pi - log pi_ref, or its absolute value."""
    kl = logprobs - ref_logprobs
    return kl.abs() if use_absolute_kl else kl


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token reward: -kl_coef * KL on every response token, plus the reward model's score on
    the last response token of each row."""
    rewards = -kl_coef * kl * mask
    last = last_index(mask)
    has = mask.sum(-1) > 0
    rewards[torch.arange(len(scores), device=scores.device)[has], last[has]] += scores[has].to(rewards.dtype)
    return rewards


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last masked entry (0 for an empty row)."""
    cols = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), cols, torch.zeros_like(cols)).amax(-1)


def gae(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the response tokens.

    V is 0 after a row's last token (the episode ends there), so the last delta is r - V(s_T).
    Returns (advantages, returns), zero outside the mask; returns = advantages + values."""
    values, rewards = values * mask, rewards * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    T = rewards.shape[1]
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, ratio_eps: float) -> Tuple[torch.Tensor, dict]:
    """Clipped surrogate: mean over tokens of max(-A * r, -A * clip(r, 1 - eps, 1 + eps))."""
    ratio = (logprobs - old_logprobs).exp()
    loss1 = -advantages * ratio
    loss2 = -advantages * ratio.clamp(1.0 - ratio_eps, 1.0 + ratio_eps)
    loss = masked_mean(torch.max(loss1, loss2), mask)
    with torch.no_grad():
        stats = {"clip_fraction": masked_mean((loss2 > loss1).float(), mask),
                 "approx_kl": masked_mean(0.5 * (logprobs - old_logprobs) ** 2, mask),
                 "ratio": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip_val: float) -> Tuple[torch.Tensor, dict]:
    """NeMo-Aligner's critic loss: 0.5 * mean(max((V - R)^2, (V_clipped - R)^2)), where V_clipped
    stays within clip_val of the rollout's value."""
    clipped = old_values + (values - old_values).clamp(-clip_val, clip_val)
    loss1 = (values - returns) ** 2
    loss2 = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(loss1, loss2), mask)
    with torch.no_grad():
        stats = {"value_clip_fraction": masked_mean((loss2 > loss1).float(), mask)}
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim (fp32)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, reducer=None) -> float:
    """1 - Var(returns - values) / Var(returns) over the response tokens."""
    _, var_r = masked_var(returns, mask, reducer)
    _, var_e = masked_var(returns - values, mask, reducer)
    return float(1.0 - var_e / var_r) if float(var_r) > 0 else float("nan")


class AdaptiveKLController:
    """The KL coefficient beta, steered toward `target` nats per response (None: fixed): after each
    PPO step beta *= exp(clip(log(KL / target), -0.2, 1) / horizon_steps): up to e^(1/horizon) a step
    when the policy runs away, down by at most e^(-0.2/horizon) while it has not moved yet (so the
    coefficient is still there when the policy starts to drift). Ziegler et al. (2019) use
    beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon (n samples): at most 0.2 n / horizon a
    step, which with TRL's horizon of 10,000 samples and 64 rollouts a step moves beta by 0.13% a step
    and never reaches the target in a run of a few hundred steps. Here `horizon` counts PPO steps."""

    def __init__(self, init: float, target: Optional[float], horizon: float):
        self.value, self.target, self.horizon = float(init), target, float(horizon)

    def update(self, kl: float, n: int = 0) -> float:
        if self.target is not None and math.isfinite(kl):
            err = math.log(kl / self.target) if kl > 0 else -1.0
            self.value *= math.exp(min(max(err, -0.2), 1.0) / max(self.horizon, 1e-9))
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])
