"""One trained PPO model (actor or critic): its fp32 masters, AdamW, schedule, and the update over a
rollout batch: `ppo_epochs` passes, optimizer steps of `global_batch_size` samples, each summed over
micro-batches of `micro_batch_size` (gradient accumulation), gradients averaged over the
data-parallel ranks, clipped, then stepped.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List

import torch

from engine import distributed as D
from engine.config import OptimConfig, typed
from engine.optim import build_optimizer, build_scheduler

from .models import MasterWeights, move_optimizer_state
from .rollout import RolloutBatch


class TrainedModel:
    def __init__(self, name: str, model: torch.nn.Module, optim_cfg, total_steps: int, *, global_batch_size: int,
                 micro_batch_size: int, grad_clip: float):
        self.name, self.model = name, model
        self.weights = MasterWeights(model)
        self.opt = build_optimizer(self.weights.master, optim_cfg)
        self.sched = build_scheduler(self.opt, optim_cfg, max(1, total_steps))
        self.world = D.world_size()
        if global_batch_size % (micro_batch_size * self.world):
            raise ValueError(f"{name}: global_batch_size={global_batch_size} is not divisible by micro_batch_size="
                             f"{micro_batch_size} x {self.world} ranks")
        self.local_batch = global_batch_size // self.world
        self.micro_batch_size, self.grad_clip = micro_batch_size, grad_clip
        try:
            self.sync_bf16 = D.bf16_grad_sync(typed(optim_cfg, OptimConfig).grad_sync_dtype)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def update(self, batch: RolloutBatch, loss_fn: Callable, epochs: int, seed: int) -> Dict[str, float]:
        """loss_fn(model, micro_batch) -> (loss, {stat: tensor}). Returns the stats averaged over
        every micro-batch (and rank), plus grad_norm and the number of optimizer steps."""
        n = len(batch)
        if n % self.local_batch:
            raise ValueError(f"{self.name}: {n} rollout samples per rank do not split into optimizer batches of "
                             f"{self.local_batch} per rank (num_rollout_samples / global_batch_size must be whole)")
        self.model.train()
        sums: Dict[str, float] = {}
        count, norms, steps = 0, [], 0
        for epoch in range(epochs):
            g = torch.Generator().manual_seed(seed * 7919 + epoch)
            order = torch.randperm(n, generator=g).tolist()
            for start in range(0, n, self.local_batch):
                rows = order[start:start + self.local_batch]
                # longest first inside the optimizer batch: micro-batches of similar length pad less
                rows.sort(key=lambda i: -int(batch.lengths[i]))
                micro = [rows[i:i + self.micro_batch_size] for i in range(0, len(rows), self.micro_batch_size)]
                for mb in micro:
                    loss, stats = loss_fn(self.model, batch.select(mb))
                    (loss / len(micro)).backward()
                    for k, v in dict(stats, loss=loss).items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
                    count += 1
                norms.append(self.step_optimizer())
                steps += 1
        out = {k: v / max(count, 1) for k, v in sums.items()}
        out = D.all_reduce_mean(out) if self.world > 1 else out
        out["grad_norm"] = sum(norms) / max(len(norms), 1)
        out["optimizer_steps"] = steps
        return out

    def step_optimizer(self) -> float:
        grads = self.weights.grads()
        D.average_gradients(grads, self.sync_bf16)  # engine's one rule, as DDP's bf16 hook
        params = [m for m in self.weights.master if m.grad is not None]
        clip = self.grad_clip if self.grad_clip and self.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, clip) if params else torch.zeros(())
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.weights.sync()
        return float(norm)

    # --- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"master": [m.detach().cpu().clone() for m in self.weights.master],
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for m, v in zip(self.weights.master, state["master"]):
            m.copy_(v)
        self.weights.sync()
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])

    def offload_optimizer(self, device) -> None:
        move_optimizer_state(self.opt, device)
        self.weights.to(device)


def model_params_fp32(models: List[torch.nn.Module]) -> int:
    return sum(p.numel() for m in models for p in m.parameters())
