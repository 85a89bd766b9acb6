"""Learning-rate schedules as closed-form functions of the optimizer step, torch-free, so that the
launcher can show and check a schedule before anything runs and the trainers step the same numbers.

NeMo's `CosineAnnealing` (nemo.core.optim.lr_scheduler, a WarmupAnnealHoldPolicy), step by step:

- step <= warmup_steps (warmup_steps > 0): lr = base * (step + 1) / (warmup_steps + 1)
- then cosine from base down to min_lr over decay_steps = max_steps - warmup_steps - constant_steps
- then min_lr held for constant_steps: NeMo's "constant" phase comes AFTER the decay (its code
  returns min_lr when warmup + decay < step <= max_steps), and min_lr past max_steps.

That last point is a trap NeMo's key names do not show: `constant_steps: 1000` (training_rm.yaml,
gpt_ppo_*.yaml) on a run shorter than ~1,010 optimizer steps leaves no cosine at all, and the run
trains at min_lr from the end of warmup on. `trap()` finds such schedules; the launcher refuses them
unless `sched.allow_min_lr_hold=true`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

COSINE_SCHEDULE = "CosineAnnealing"
CONSTANT_SCHEDULES = ("constant", "Constant", "ConstantLR", None)
SCHEDULE_NAMES = (COSINE_SCHEDULE,) + CONSTANT_SCHEDULES
# a run is refused when more than this share of its optimizer steps would sit at min_lr
MAX_MIN_LR_SHARE = 0.5


def _optim(optim_cfg: Any):
    """The typed OptimConfig (engine/config.py): its defaults, never a second set here."""
    from .config import OptimConfig, typed

    return typed(optim_cfg, OptimConfig)


def cosine_lr(step: int, base_lr: float, *, max_steps: int, warmup_steps: int = 0, constant_steps: int = 0,
              min_lr: float = 0.0) -> float:
    """NeMo's CosineAnnealing at `step` (the number of optimizer steps taken so far)."""
    decay_steps = max_steps - (constant_steps + warmup_steps)
    if warmup_steps > 0 and step <= warmup_steps:
        return base_lr * (step + 1) / (warmup_steps + 1)
    if constant_steps > 0 and warmup_steps + decay_steps < step <= max_steps:
        return min_lr
    if step > max_steps:
        return min_lr
    if constant_steps == 0:
        span = max(1, max_steps - warmup_steps)
        mult = 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / span))
        return (base_lr - min_lr) * mult + min_lr
    ratio = (step - warmup_steps) / max(1, decay_steps)
    return min_lr + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (base_lr - min_lr)


def constant_lr(step: int, base_lr: float, *, warmup_steps: int = 0) -> float:
    """`sched.name: constant` (or no sched): linear warmup as NeMo's WarmupPolicy, then the base lr."""
    if warmup_steps > 0 and step <= warmup_steps:
        return base_lr * (step + 1) / (warmup_steps + 1)
    return base_lr


def lr_function(optim_cfg: Any, total_steps: int):
    """step -> lr for `optim_cfg` (NeMo's keys: lr, sched.{name, warmup_steps, constant_steps, min_lr})
    over a run of `total_steps` optimizer steps."""
    o = _optim(optim_cfg)
    base, sched = float(o.lr), o.sched
    name = sched.name if sched is not None else None
    warmup = int(sched.warmup_steps) if sched is not None else 0
    if name in CONSTANT_SCHEDULES:
        return lambda s: constant_lr(s, base, warmup_steps=warmup)
    if name != COSINE_SCHEDULE:
        raise ValueError(f"optim.sched.name={name!r}: expected CosineAnnealing | constant")
    kw = dict(max_steps=int(total_steps), warmup_steps=warmup, constant_steps=int(sched.constant_steps),
              min_lr=float(sched.min_lr))
    return lambda s: cosine_lr(s, base, **kw)


@dataclass
class ScheduleShape:
    """What a schedule does over one run: the lr of optimizer steps 1..total_steps."""
    name: Optional[str]
    total_steps: int
    warmup: int  # steps below the peak lr at the start
    at_min_lr: int  # steps whose lr is min_lr (when min_lr is below the peak)
    lr_start: float
    lr_peak: float
    lr_end: float
    min_lr: float

    @property
    def min_lr_share(self) -> float:
        return self.at_min_lr / max(1, self.total_steps)

    def describe(self) -> str:
        decay = self.total_steps - self.warmup - self.at_min_lr
        if self.min_lr >= self.lr_peak * (1 - 1e-9):  # min_lr = lr (or a constant schedule): flat after warmup
            decay = 0
        return (f"{self.name or 'constant'} over {self.total_steps} optimizer steps: warmup {self.warmup}, "
                f"decay {max(decay, 0)}, at min_lr {self.at_min_lr} ({100 * self.min_lr_share:.0f}%)"
                f"{', then flat' if decay == 0 and self.at_min_lr == 0 else ''}; "
                f"lr start {self.lr_start:.3g}, peak {self.lr_peak:.3g}, end {self.lr_end:.3g}")


def shape(optim_cfg: Any, total_steps: int) -> ScheduleShape:
    total = max(1, int(total_steps))
    f = lr_function(optim_cfg, total)
    lrs = [f(s) for s in range(total)]  # the lr of optimizer step s + 1
    sched = _optim(optim_cfg).sched
    name = sched.name if sched is not None else None
    peak = max(lrs)
    min_lr = float(sched.min_lr) if name == COSINE_SCHEDULE else peak
    warm = next((i for i, x in enumerate(lrs) if x >= peak * (1 - 1e-9)), 0)
    # warmup steps below min_lr are warmup, not a hold at min_lr: count only from the peak on
    at_min = sum(1 for x in lrs[warm:] if x <= min_lr * (1 + 1e-9)) if min_lr < peak * (1 - 1e-9) else 0
    return ScheduleShape(name, total, warm, at_min, lrs[0], peak, lrs[-1], min_lr)


def trap(key: str, optim_cfg: Any, total_steps: int, how: str) -> Optional[str]:
    """A message when the schedule at `key` (e.g. "rm.model.optim") would sit at min_lr for most of a
    run of `total_steps` optimizer steps (`how` says where that number comes from), None when it fits
    or the user asked for it (`sched.allow_min_lr_hold: true`)."""
    sched = _optim(optim_cfg).sched
    if sched is None or sched.allow_min_lr_hold:
        return None
    s = shape(optim_cfg, total_steps)
    if s.min_lr_share <= MAX_MIN_LR_SHARE:
        return None
    warmup, constant = int(sched.warmup_steps), int(sched.constant_steps)
    fits = [f"{key}.sched.constant_steps=0 (cosine from the end of warmup to the end of the run)"]
    if constant and s.total_steps // 4 > 0:
        fits.append(f"constant_steps<={s.total_steps // 4}")
    if warmup > s.total_steps // 4:
        fits.append(f"with warmup_steps<={max(1, s.total_steps // 10)} (warmup_steps={warmup} is "
                    f"{100 * warmup / s.total_steps:.0f}% of the run)")
    return (f"{key}.sched: this run has {s.total_steps} optimizer steps ({how}), and warmup_steps={warmup} + "
            f"constant_steps={constant} (NeMo holds min_lr for constant_steps at the END of the schedule) leave "
            f"{s.at_min_lr} of them ({100 * s.min_lr_share:.0f}%) at min_lr={s.min_lr:g} instead of lr="
            f"{s.lr_peak:g}: {s.describe()}. Fits this run: {' or '.join(fits[:2])}{' ' + fits[2] if len(fits) > 2 else ''}; or set "
            f"{key}.sched.allow_min_lr_hold=true to run this schedule as it is")


def check_run(key: str, optim_cfg: Any, total_steps: int, how: str, log=None) -> None:
    """The launcher's rule, inside a stage that knows its real step count: log the shape, refuse a trap."""
    if log is not None:
        log.info("%s: %s  [%s]", key, shape(optim_cfg, total_steps).describe(), how)
    msg = trap(key, optim_cfg, total_steps, how)
    if msg:
        raise ValueError(msg)
