"""AdamW with weight-decay groups and NeMo's CosineAnnealing schedule, for every training stage.

    opt = build_optimizer(model, cfg.rm.model.optim)          # optim: {name, lr, weight_decay, betas, eps, sched}
    sched = build_scheduler(opt, cfg.rm.model.optim, max_steps)
    ... opt.step(); sched.step()                              # once per optimizer step

`optim_cfg` is an `engine.config.OptimConfig` (a DictConfig or a dict with NeMo's key names is
converted to one: every default is the dataclass's, there is no second set here).
"""
from __future__ import annotations

import logging
from typing import Iterable, List, Union

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from .config import OptimConfig, typed
from .schedule import CONSTANT_SCHEDULES, COSINE_SCHEDULE, constant_lr, cosine_lr

log = logging.getLogger(__name__)


def param_groups(params_or_model: Union[nn.Module, Iterable], weight_decay: float) -> List[dict]:
    """Megatron's rule: no weight decay on biases and norm weights (every tensor of fewer than 2
    dims); decay on matrices, embeddings included. Frozen parameters are left out."""
    if isinstance(params_or_model, nn.Module):
        named = list(params_or_model.named_parameters())
    else:
        items = list(params_or_model)
        if items and isinstance(items[0], dict):  # already groups
            return items
        named = [(str(i), p) for i, p in enumerate(items)]
    decay = [p for _, p in named if p.requires_grad and p.ndim >= 2]
    no_decay = [p for _, p in named if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(params_or_model, optim_cfg) -> torch.optim.Optimizer:
    """AdamW (NeMo's `adamw`/`fused_adam`/`adam` names all map here; `adam` keeps decoupled decay
    too, as NeMo's fused_adam does). Uses the fused CUDA kernel when every parameter is on a GPU."""
    o = typed(optim_cfg, OptimConfig)
    name = str(o.name).lower()
    if name not in ("adamw", "adam", "fused_adam", "distributed_fused_adam"):
        raise ValueError(f"optim.name={name!r}: only AdamW is implemented (adamw | adam | fused_adam)")
    if len(o.betas) != 2:
        raise ValueError(f"optim.betas={list(o.betas)}: expected two numbers [beta1, beta2]")
    lr, wd, eps = float(o.lr), float(o.weight_decay), float(o.eps)
    betas = (float(o.betas[0]), float(o.betas[1]))
    groups = param_groups(params_or_model, wd)
    params = [p for g in groups for p in g["params"]]
    kwargs = {}
    if params and all(p.is_cuda for p in params):
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=wd, **kwargs)


class CosineAnnealing(LRScheduler):
    """NeMo's `CosineAnnealing` (nemo.core.optim.lr_scheduler, a WarmupAnnealHoldPolicy), step by step:

    - step <= warmup_steps (warmup_steps > 0): lr = base * (step + 1) / (warmup_steps + 1)
    - then cosine from base down to min_lr over decay_steps = max_steps - warmup_steps - constant_steps
    - then min_lr held for constant_steps (NeMo's "constant" phase comes AFTER the decay: its
      code returns min_lr when warmup + decay < step <= max_steps), and min_lr past max_steps.

    With constant_steps = 0 the cosine runs over max_steps - warmup_steps, as NeMo's
    `_cosine_annealing`. If constant_steps + warmup_steps >= max_steps there is no decay phase:
    NeMo then holds min_lr right after warmup, and so does this (with a warning).
    The lr is a closed-form function of the step, so a restored scheduler continues exactly.
    """

    def __init__(self, optimizer, *, max_steps: int, warmup_steps: int = 0, constant_steps: int = 0,
                 min_lr: float = 0.0, last_epoch: int = -1):
        self.max_steps = int(max_steps)
        self.warmup_steps = int(warmup_steps or 0)
        self.constant_steps = int(constant_steps or 0)
        self.min_lr = float(min_lr)
        self.decay_steps = self.max_steps - (self.constant_steps + self.warmup_steps)
        if self.constant_steps > 0 and self.decay_steps <= 0:
            log.warning("CosineAnnealing: warmup_steps (%d) + constant_steps (%d) >= max_steps (%d): no cosine "
                        "phase, lr goes to min_lr right after warmup (NeMo's behaviour)",
                        self.warmup_steps, self.constant_steps, self.max_steps)
        for g in optimizer.param_groups:
            if g.get("initial_lr", g["lr"]) < self.min_lr:
                raise ValueError(f"CosineAnnealing: lr {g['lr']} is below min_lr {self.min_lr}")
        super().__init__(optimizer, last_epoch)

    def lr_at(self, step: int, base_lr: float) -> float:
        return cosine_lr(step, base_lr, max_steps=self.max_steps, warmup_steps=self.warmup_steps,
                         constant_steps=self.constant_steps, min_lr=self.min_lr)

    def get_lr(self):
        return [self.lr_at(self.last_epoch, base) for base in self.base_lrs]


class ConstantLR(LRScheduler):
    """`sched.name: constant` (or no sched): linear warmup as NeMo's WarmupPolicy, then the base lr."""

    def __init__(self, optimizer, *, warmup_steps: int = 0, last_epoch: int = -1, **_):
        self.warmup_steps = int(warmup_steps or 0)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        return [constant_lr(self.last_epoch, base, warmup_steps=self.warmup_steps) for base in self.base_lrs]


def build_scheduler(optimizer, optim_cfg, max_steps: int) -> LRScheduler:
    """The schedule named by `optim.sched.name` (CosineAnnealing | constant | null); one step per
    optimizer step. `max_steps` is the run's total number of optimizer steps."""
    sched = typed(optim_cfg, OptimConfig).sched
    name = sched.name if sched is not None else None
    warmup = int(sched.warmup_steps) if sched is not None else 0
    if name in CONSTANT_SCHEDULES:
        return ConstantLR(optimizer, warmup_steps=warmup)
    if name != COSINE_SCHEDULE:
        raise ValueError(f"optim.sched.name={name!r}: expected CosineAnnealing | constant")
    return CosineAnnealing(optimizer, max_steps=max_steps, warmup_steps=warmup,
                           constant_steps=int(sched.constant_steps), min_lr=float(sched.min_lr))
