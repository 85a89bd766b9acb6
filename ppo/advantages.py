"""Critic-free advantage estimators: GRPO (group-normalized rewards) and RLOO (leave-one-out baseline).

A rollout batch for these holds k responses per prompt, laid out prompt by prompt: rows
[p0 r0, p0 r1, ..., p0 r(k-1), p1 r0, ...] (`group_size` = k). Each response gets one scalar
advantage, put on every one of its response tokens; no value function is learned.

- GRPO (DeepSeekMath, Shao et al. 2024): A_i = (R_i - mean(R_group)) / (std(R_group) + eps), std the
  unbiased sample std of the k rewards (as TRL's GRPOTrainer); `scale_rewards=False` keeps
  R_i - mean (Dr. GRPO's fix for the length/difficulty bias of the std division).
- RLOO (Ahmadian et al. 2024; NeMo-Aligner's REINFORCE baseline): A_i = R_i - mean_{j != i} R_j
  = k / (k - 1) * (R_i - mean(R_group)).

R is the sequence reward: the reward model's score minus the KL penalty summed over the response
(`sequence_rewards`), as RLOO and NeMo-Aligner's REINFORCE use it, so the KL coefficient keeps its
PPO meaning (nats of KL per unit of reward).
"""
from __future__ import annotations

import torch

ESTIMATORS = ("gae", "grpo", "rloo")


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [B], got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: a group baseline needs at least 2 responses per prompt")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.float().view(-1, group_size)


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6,
                    scale_rewards: bool = True) -> torch.Tensor:
    """[B] sequence rewards (k consecutive rows per prompt) -> [B] group-normalized advantages."""
    g = _groups(rewards, group_size)
    adv = g - g.mean(-1, keepdim=True)
    if scale_rewards:
        adv = adv / (g.std(-1, keepdim=True, unbiased=True) + eps)
    return adv.reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] sequence rewards -> [B] rewards minus the mean of the other k - 1 responses to the same prompt."""
    g = _groups(rewards, group_size)
    others = (g.sum(-1, keepdim=True) - g) / (group_size - 1)
    return (g - others).reshape(-1)


def sequence_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """[B] score - kl_coef * sum over the response tokens of the per-token KL ([B, T], mask [B, T])."""
    return scores.float() - kl_coef * (kl.float() * mask).sum(-1)


def token_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] per-response advantages -> [B, T] on every response token, 0 elsewhere."""
    return advantages[:, None].to(mask.dtype) * mask


def check_estimator(estimator: str, group_size: int, num_rollout_samples: int, ranks: int = 1) -> None:
    """The keys' rules, named: a known estimator; grpo / rloo need >= 2 responses per prompt; whole groups
    per step and per rank."""
    where = "ppo.model.ppo"
    if estimator not in ESTIMATORS:
        raise ValueError(f"{where}.advantage_estimator={estimator!r}: expected one of {' | '.join(ESTIMATORS)}")
    if group_size < 1 or (estimator != "gae" and group_size < 2):
        raise ValueError(f"{where}.num_rollouts_per_prompt={group_size}: {estimator} needs at least 2 responses per "
                         "prompt (its baseline is the other responses to the same prompt)" if estimator != "gae" else
                         f"{where}.num_rollouts_per_prompt={group_size}: must be >= 1")
    if num_rollout_samples % (group_size * ranks):
        raise ValueError(f"{where}.num_rollout_samples={num_rollout_samples} is not divisible by "
                         f"num_rollouts_per_prompt={group_size} x {ranks} data-parallel ranks (each rank holds whole "
                         "groups of responses)")


def critic_free_advantages(estimator: str, scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                           kl_coef: float, group_size: int) -> torch.Tensor:
    """The [B, T] advantages of `grpo` or `rloo` for one rollout batch (k consecutive rows per prompt)."""
    r = sequence_rewards(scores, kl, mask, kl_coef)
    if estimator == "grpo":
        a = grpo_advantages(r, group_size)
    elif estimator == "rloo":
        a = rloo_advantages(r, group_size)
    else:
        raise ValueError(f"advantage_estimator={estimator!r}: the critic-free ones are grpo | rloo")
    return token_advantages(a, mask)
