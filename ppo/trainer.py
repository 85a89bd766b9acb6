"""The PPO loop: rollout (generate, score) -> KL-penalised rewards -> GAE -> critic and actor updates,
with validation rollouts, metrics, checkpoints and exact resume.

One step = `num_rollout_samples` prompts (each rank generates its share) and the updates on them.
Timings split the step into generation, scoring (the forward passes of policy, reference, critic and
reward model) and training; on a GPU each is measured after a device synchronize.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Dict, List, Optional

import torch

from engine import distributed as D
from engine.io import atomic_write

from . import algorithms as A
from modeling import clear_generation_state

from .models import FrozenOffload
from .advantages import check_estimator, critic_free_advantages
from .optimization import TrainedModel
from .rollout import EndCondition, RolloutBatch, generate_responses, score, token_logprobs, token_values

log = logging.getLogger(__name__)


class PPOTrainer:
    def __init__(self, pcfg, *, actor, reference, reward, critic, tokenizer, train_data, val_data, device,
                 max_steps: int, stage_dir: str, logger=None, offload_idle_models: bool = False):
        self.cfg, self.device, self.max_steps, self.stage_dir = pcfg, device, max_steps, stage_dir
        self.loop, self.rcfg = pcfg.trainer.ppo, pcfg.model.ppo
        self.actor_model, self.reference, self.reward, self.critic_model = actor, reference, reward, critic
        self.tokenizer, self.train_data, self.val_data, self.logger = tokenizer, train_data, val_data, logger
        self.rank, self.world = D.rank(), D.world_size()
        n = self.rcfg.num_rollout_samples
        if n % self.world:
            raise ValueError(f"num_rollout_samples={n} is not divisible by the {self.world} ranks")
        self.estimator, self.group = self.rcfg.advantage_estimator, int(self.rcfg.num_rollouts_per_prompt)
        check_estimator(self.estimator, self.group, n, self.world)
        opt_steps = max_steps * self.rcfg.ppo_epochs
        actor_gbs, critic_gbs = pcfg.model.global_batch_size, pcfg.critic.global_batch_size
        self.actor = TrainedModel("actor", actor, pcfg.model.optim,
                                  max(1, max_steps - (self.loop.critic_warmup_steps if critic is not None else 0)) * self.rcfg.ppo_epochs * max(1, n // actor_gbs),
                                  global_batch_size=actor_gbs, micro_batch_size=pcfg.model.micro_batch_size,
                                  grad_clip=self.loop.gradient_clip_val)
        # grpo / rloo: no critic is built, trained or kept (critic is None)
        self.critic = None if critic is None else TrainedModel(
            "critic", critic, pcfg.critic.optim, opt_steps * max(1, n // critic_gbs), global_batch_size=critic_gbs,
            micro_batch_size=pcfg.critic.micro_batch_size, grad_clip=self.loop.gradient_clip_val)
        ak = self.loop.adaptive_kl
        self.kl_ctl = A.AdaptiveKLController(self.loop.initial_policy_kl_penalty,
                                             ak.target if ak.enable else None, ak.horizon)
        self.end = EndCondition(tokenizer, self.rcfg.sampling_params.end_strings)
        log.info("responses end at %s (ppo.model.ppo.sampling_params.end_strings%s) or after %d tokens",
                 self.end.end_strings, ": null = the tokenizer's and the prompt format's" if
                 self.rcfg.sampling_params.end_strings is None else "", self.rcfg.length_params.max_length)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        seed = pcfg.model.seed
        self.sample_gen = torch.Generator(device=device).manual_seed(seed * 1000 + self.rank)
        self.step = 0
        self.offloader = FrozenOffload([reference, reward], device) if offload_idle_models and device.type == "cuda" \
            else None
        self.reducer = (lambda t: torch.distributed.all_reduce(t)) if self.world > 1 else None

    # --- helpers -------------------------------------------------------------------------------
    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _offload_idle(self):
        """Training is next: drop the frozen models and the generation KV cache from the GPU."""
        if self.offloader is not None:
            self.offloader.offload()
            clear_generation_state(self.actor_model)

    def _rollout(self, prompts: List[List[int]], timers: Dict[str, float], greedy: Optional[bool] = None,
                 generator: Optional[torch.Generator] = None, micro_batch_size: Optional[int] = None) -> RolloutBatch:
        t0 = time.perf_counter()
        if self.offloader is not None:
            self.offloader.prefetch()  # uploads while the policy generates
        batch = generate_responses(self.actor_model, prompts, micro_batch_size=micro_batch_size or self.rcfg.rollout_micro_batch_size,
                                   sampling=self.rcfg.sampling_params, length=self.rcfg.length_params,
                                   end=self.end, eos_id=self.tokenizer.eos_id, pad_id=self.pad_id,
                                   generator=generator or self.sample_gen, greedy=greedy)
        self._sync()
        timers["generation"] = timers.get("generation", 0.0) + time.perf_counter() - t0
        if self.offloader is not None:
            self.offloader.wait()
        score(batch, actor=self.actor_model, reference=self.reference, critic=self.critic_model, reward=self.reward,
              micro_batch_size=self.rcfg.forward_micro_batch_size,
              standardize=self.cfg.critic.reward_standardization, missing_eos_penalty=self.rcfg.missing_eos_penalty,
              timers=timers, sync=self._sync)
        return batch

    def _advantages(self, batch: RolloutBatch) -> Dict[str, float]:
        kl = A.kl_per_token(batch.logprobs, batch.ref_logprobs, self.loop.use_absolute_kl)
        if self.critic is None:  # grpo / rloo: the group of each prompt's responses is the baseline
            batch.advantages = critic_free_advantages(self.estimator, batch.rewards, kl, batch.mask, self.kl_ctl.value,
                                                      self.group)
            batch.returns = torch.zeros_like(batch.advantages)
            return {"explained_variance": float("nan")}
        rewards = A.token_rewards(batch.rewards, kl, batch.mask, self.kl_ctl.value)
        adv, ret = A.gae(batch.values, rewards, batch.mask, self.loop.discount_factor, self.loop.gae_lambda)
        if self.loop.normalize_advantages:
            adv = A.whiten(adv, batch.mask, self.reducer)
        batch.advantages, batch.returns = adv, ret
        return {"explained_variance": A.explained_variance(batch.values, ret, batch.mask, self.reducer)}

    def _stats(self, batch: RolloutBatch, prefix: str = "") -> Dict[str, float]:
        """Rollout statistics, reduced over ranks: reward (the reward model's score) mean/std, KL per
        response and per token, lengths, and the share of responses cut at max_length (no end)."""
        kl_seq = ((batch.logprobs - batch.ref_logprobs) * batch.mask).sum(-1)
        resp = (batch.lengths - batch.prompt_lengths).float()
        cut = (~batch.ended).float() if batch.ended is not None else torch.zeros_like(resp)
        s = {"n": float(len(batch)), "r": float(batch.scores.sum()), "r2": float((batch.scores ** 2).sum()),
             "kl": float(kl_seq.sum()), "len": float(resp.sum()), "plen": float(batch.prompt_lengths.float().sum()),
             "cut": float(cut.sum())}
        s = D.all_reduce_sum(s)
        n = s["n"]
        mean = s["r"] / n
        return {f"{prefix}reward_mean": mean, f"{prefix}reward_std": math.sqrt(max(s["r2"] / n - mean * mean, 0.0)),
                f"{prefix}kl": s["kl"] / n, f"{prefix}kl_per_token": s["kl"] / max(s["len"], 1.0),
                f"{prefix}response_length": s["len"] / n, f"{prefix}prompt_length": s["plen"] / n,
                f"{prefix}cut_at_max_length": s["cut"] / n}

    # --- losses --------------------------------------------------------------------------------
    def _actor_loss(self, model, mb: RolloutBatch):
        bonus = self.rcfg.entropy_bonus
        lp, ent = token_logprobs(model, mb.tokens, mb.mask, with_entropy=bonus > 0)
        loss, stats = A.policy_loss(lp, mb.logprobs, mb.advantages, mb.mask, self.rcfg.ratio_eps)
        stats["policy_loss"] = loss.detach()
        if bonus > 0:
            ent_mean = A.masked_mean(ent, mb.mask)
            loss = loss - bonus * ent_mean
        return loss, stats

    def _critic_loss(self, model, mb: RolloutBatch):
        v = token_values(model, mb.tokens, mb.mask)
        return A.value_loss(v, mb.values, mb.returns, mb.mask, self.cfg.critic.loss_clip_val)

    # --- one step --------------------------------------------------------------------------------
    def train_step(self) -> Dict[str, float]:
        t_start = time.perf_counter()
        timers: Dict[str, float] = {}
        n = self.rcfg.num_rollout_samples
        # k responses per prompt, consecutive rows (a rank holds whole groups): n / k prompts a step
        k = self.group
        prompts = [p for p in self.train_data.batch(self.step, n // k, self.rank, self.world) for _ in range(k)]
        batch = self._rollout(prompts, timers)
        metrics = self._stats(batch)
        metrics.update(self._advantages(batch))
        t0 = time.perf_counter()
        self._offload_idle()
        seed = self.cfg.model.seed * 100003 + self.step
        if self.critic is not None:
            metrics.update({f"critic_{k}": v for k, v in self.critic.update(batch, self._critic_loss,
                                                                            self.rcfg.ppo_epochs, seed).items()})
        if self.step >= self.loop.critic_warmup_steps or self.critic is None:
            metrics.update({f"actor_{k}": v for k, v in self.actor.update(batch, self._actor_loss, self.rcfg.ppo_epochs,
                                                                          seed + 1).items()})
        self._sync()
        timers["training"] = time.perf_counter() - t0
        self.kl_ctl.update(metrics["kl"])
        self.step += 1
        total = time.perf_counter() - t_start
        gen_tokens = D.all_reduce_sum({"t": float((batch.lengths - batch.prompt_lengths).sum())})["t"]
        metrics.update({
            "kl_coef": self.kl_ctl.value, "lr_actor": self.actor.lr, "lr_critic": self.critic.lr if self.critic else float("nan"),
            "time_generation": timers["generation"], "time_scoring": timers["scoring"],
            "time_training": timers["training"], "time_step": total,
            "generation_tokens_per_s": gen_tokens / max(timers["generation"], 1e-9),
            "consumed_samples": self.step * n,
        })
        for k in ("actor_clip_fraction", "actor_approx_kl", "critic_loss", "actor_policy_loss"):
            metrics.setdefault(k, float("nan"))
        metrics["value_loss"] = metrics.pop("critic_loss")
        metrics["clip_fraction"] = metrics.pop("actor_clip_fraction")
        metrics["entropy"] = self._entropy(batch)
        if self.device.type == "cuda":
            metrics["peak_mem_gib"] = D.peak_memory_gib(self.device)
        return metrics

    @torch.no_grad()
    def _entropy(self, batch: RolloutBatch) -> float:
        """Mean policy entropy per response token, on a slice of the rollout (at most 8 rows)."""
        rows = list(range(min(len(batch), 8)))
        sub = batch.select(rows)
        was = self.actor_model.training
        self.actor_model.eval()
        _, ent = token_logprobs(self.actor_model, sub.tokens, sub.mask, with_entropy=True)
        self.actor_model.train(was)
        s = D.all_reduce_sum({"e": float((ent * sub.mask).sum()), "n": float(sub.mask.sum())})
        return s["e"] / max(s["n"], 1.0)

    # --- validation -------------------------------------------------------------------------------
    def validate(self, samples_dir: Optional[str] = None, n_samples: int = 8) -> Dict[str, float]:
        """Rollouts on the first `num_val_samples` validation prompts with a fixed sampling seed (the
        same draws every time, so the curve moves only with the policy); rank 0 writes samples."""
        n = self.rcfg.num_val_samples - self.rcfg.num_val_samples % self.world
        if n <= 0:
            return {}
        share = n // self.world
        prompts = [self.val_data.prompts[i % len(self.val_data)] for i in range(self.rank * share, (self.rank + 1) * share)]
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.model.seed * 1000 + 999 + self.rank)
        timers: Dict[str, float] = {}
        batch = self._rollout(prompts, timers, generator=gen, micro_batch_size=self.rcfg.val_rollout_micro_batch_size)
        self._offload_idle()
        stats = self._stats(batch, prefix="val_")
        stats["val_global_rewards"] = stats["val_reward_mean"]
        if samples_dir and D.is_main():
            os.makedirs(samples_dir, exist_ok=True)
            path = os.path.join(samples_dir, f"step_{self.step:06d}.jsonl")
            with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
                for i in range(min(n_samples, len(batch))):
                    p, ln = int(batch.prompt_lengths[i]), int(batch.lengths[i])
                    toks = batch.tokens[i].tolist()
                    f.write(json.dumps({"step": self.step, "prompt": self.tokenizer.decode(toks[:p]),
                                        "response": self.tokenizer.decode(toks[p:ln]),
                                        "reward": round(float(batch.scores[i]), 5),
                                        "ended": bool(batch.ended[i]) if batch.ended is not None else None},
                                       ensure_ascii=False) + "\n")
        return stats

    # --- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        gens = _gather(self.sample_gen.get_state().cpu())
        return {"step": self.step, "actor": self.actor.state_dict(),
                "critic": self.critic.state_dict() if self.critic is not None else {},
                "kl_ctl": self.kl_ctl.state_dict(), "sample_generator": gens}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.actor.load_state_dict(state["actor"])
        if self.critic is not None:
            self.critic.load_state_dict(state["critic"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        gens = state["sample_generator"]
        self.sample_gen.set_state(gens[self.rank % len(gens)])


def _gather(obj) -> list:
    """Every rank's `obj`, in rank order (rank 0 saves the checkpoint for all)."""
    if D.world_size() <= 1:
        return [obj]
    out = [None] * D.world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
