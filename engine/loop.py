"""The one training loop every training stage runs: step, log, validate, checkpoint, preempt, resume,
profile. A stage builds a *task* (its models, optimizers and data) and hands it to `TrainingLoop`:

    loop = TrainingLoop(task, LoopConfig(max_steps=run_length(...), val_check_interval=100,
                        save_interval=100), stage_dir=..., name="rm", checkpoints=manager,
                        identity=stage_identity(cfg, SECTIONS, RESUMABLE))
    last_val = loop.run()          # raises SystemExit(75) after checkpointing on SIGUSR1/SIGTERM

A task is any object with these four methods (rm_training.trainer.RMTask, ppo.stage.PPOTask):

    train_step(step: int) -> {metric: float}
        run optimizer step `step` (0-based; the loop counts). The task draws that step's data from
        the step alone (a seeded permutation, a prompt cursor), so the step is the data position
        and a resumed run continues exactly. Called on every rank.
    validate(should_stop: () -> bool) -> {metric: float} | None
        metrics over the validation set, logged as split "val" and, prefixed `val_` where they are
        not, ranked by `exp_manager.checkpoint_callback_params.monitor`. Poll `should_stop()`
        between micro-batches (a collective: call it on every rank the same number of times) and
        return None when it says stop: the loop checkpoints and runs that validation after resume.
    state_dict() -> dict
        everything that must survive a restart (models, optimizers, schedulers, generators), plain
        values and tensors only (checkpoints load with weights_only=True). Called on every rank (it
        may gather); rank 0's is written.
    load_state_dict(state: dict) -> None
        the inverse, on every rank.

and optionally `progress(metrics) -> (samples, tokens, {postfix})` for the progress bar,
`on_validated(step, metrics, end)` (e.g. plot while running) and `on_saved(path, is_best)` (rank 0,
side files such as a .nemo next to the checkpoint).

The rules, the same for every stage:
- run length: NeMo/PTL's, training stops at whichever of max_steps and max_epochs comes first
  (`run_length`; the log says which one capped the run).
- validation every `val_check_interval` steps and at the end (0: only at the end); a checkpoint every
  `save_interval` steps and at the end (0: only at the end, and on preemption).
- preemption: SIGUSR1 / SIGTERM checkpoint at the next step boundary, before a validation that is
  due (and cut a running validation short), then exit 75 (engine/preemption.py). The grace period
  Slurm gives must only cover one step, never a step plus a validation.
- resume: only checkpoints the same config wrote (engine/resume.py: identity.json for the folder,
  its digest inside every checkpoint); the RNG states of every rank come back.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from . import distributed as D
from .checkpointing import CheckpointManager, load_state, rng_state, set_rng_state
from .io import fix_mode
from .metrics import MetricsLogger
from .preemption import PREEMPTED_EXIT, PreemptionHandler
from .profiling import StepProfiler
from .progress import Progress
from .resume import digest as identity_digest, move_aside

log = logging.getLogger(__name__)


def every(step: int, interval: int) -> bool:
    """True every `interval` steps; never for 0 (the loop adds the end of training)."""
    return interval > 0 and step % interval == 0


def run_length(max_steps: Optional[int], max_epochs: Optional[int], steps_per_epoch: int, where: str,
               logger: Optional[logging.Logger] = None) -> int:
    """NeMo/PTL's rule for every stage: training stops at whichever of `max_steps` and `max_epochs`
    (x steps_per_epoch) comes first; -1, 0 or null is no limit; both unset is an error. `where` is the
    trainer section ("rm.trainer.rm") the keys are named by in messages and the log."""
    by_epochs = max_epochs * steps_per_epoch if max_epochs and max_epochs > 0 else None
    by_steps = max_steps if max_steps and max_steps > 0 else None
    if by_epochs is None and by_steps is None:
        raise ValueError(f"{where}.max_epochs={max_epochs} and {where}.max_steps={max_steps} set no limit: set one")
    steps = min(x for x in (by_epochs, by_steps) if x is not None)
    if steps <= 0:
        raise ValueError(f"{where}.max_epochs={max_epochs} x {steps_per_epoch} steps per epoch is 0 steps")
    if logger is not None and by_epochs is not None and by_steps is not None and by_epochs != by_steps:
        if by_steps < by_epochs:
            logger.info("%s.max_steps=%d caps the run: %d steps, not the %d of max_epochs=%d (x %d steps per epoch)",
                        where, by_steps, steps, by_epochs, max_epochs, steps_per_epoch)
        else:
            logger.info("%s.max_epochs=%d (x %d steps per epoch) caps the run: %d steps, not max_steps=%d",
                        where, max_epochs, steps_per_epoch, steps, by_steps)
    return steps


@dataclass
class LoopConfig:
    max_steps: int  # the run's length in optimizer steps (run_length)
    val_check_interval: int = 100  # steps; 0 = only at the end
    save_interval: int = 100  # steps; 0 = only at the end (and on preemption)
    log_every_n_steps: int = 1
    validate_at_start: bool = False  # a step-0 validation (PPO's baseline), not repeated on resume
    has_validation: bool = True
    resume: bool = True  # exp_manager.resume_if_exists
    monitor: str = "val_loss"
    torch_profile: Any = None  # engine.config.TorchProfileConfig
    progress_unit: str = "samples"
    progress_every: int = 10  # steps between plain progress lines (no terminal)


class TrainingLoop:
    def __init__(self, task, config: LoopConfig, *, stage_dir: str, name: str, checkpoints: CheckpointManager,
                 identity: Optional[dict] = None, device: Optional[torch.device] = None):
        self.task, self.c, self.stage_dir, self.name = task, config, stage_dir, name
        self.ckpt, self.device = checkpoints, device
        self.identity = identity
        self.digest = identity_digest(identity) if identity is not None else None
        self.step = 0
        self.last_val: Dict[str, float] = {}
        self.logger: Optional[MetricsLogger] = None
        self.preempt = PreemptionHandler()
        self.world, self.rank = D.world_size(), D.rank()

    # --- preemption ---------------------------------------------------------------------------
    def stop_requested(self) -> bool:
        """Has any rank been signalled? A collective when there are several ranks."""
        flag = float(self.preempt.requested or 0)
        return (D.all_reduce_max(flag, self.device) if self.world > 1 else flag) > 0

    # --- checkpoints --------------------------------------------------------------------------
    def _rngs(self) -> list:
        if self.world == 1:
            return [rng_state()]
        out = [None] * self.world
        dist.all_gather_object(out, rng_state())
        return out

    def save(self, step_metrics: Dict[str, float], pending_validation: bool = False,
             collective: bool = True) -> Optional[str]:
        """Checkpoint the task (every rank calls it; rank 0 writes). `collective=False` after a
        Ctrl-C, when the other ranks may be gone."""
        state = dict(self.task.state_dict(), step=self.step, last_val=dict(self.last_val),
                     pending_validation=bool(pending_validation),
                     rng_per_rank=self._rngs() if collective else [rng_state()], world_size=self.world,
                     config_digest=self.digest)
        path = None
        if D.is_main():
            metrics = dict(step_metrics, **self.last_val)
            is_best = self.ckpt.is_best(metrics.get(self.c.monitor))
            path = self.ckpt.save(state, self.step, metrics)
            log.info("checkpoint saved: %s", path)
            hook = getattr(self.task, "on_saved", None)
            if hook is not None:
                hook(path, is_best)
        if collective:
            D.barrier()
        return path

    def resume(self) -> Optional[dict]:
        """Load the newest checkpoint (when allowed and written by this config); its loop state or None."""
        path = D.broadcast_object(self.ckpt.latest() if D.is_main() else None)
        if not (self.c.resume and path):
            return None
        st = load_state(path, map_location="cpu", restore_rng=False)
        found = st.get("config_digest")
        if self.digest is not None and found is not None and found != self.digest:
            D.barrier()
            if D.is_main():  # identity.json matched but this file did not: it came from another config
                move_aside(self.ckpt.dir, self.identity, f"{path} holds config digest {found}, this config's is "
                           f"{self.digest}", self.name)
                self.ckpt.entries = []
            D.barrier()
            return None
        self.task.load_state_dict(st)
        self.step, self.last_val = int(st["step"]), dict(st.get("last_val") or {})
        rngs = st.get("rng_per_rank") or [st.get("rng")]
        if rngs[0] is not None:
            set_rng_state(rngs[self.rank] if len(rngs) == self.world else rngs[0])
        log.info("resumed from %s at step %d", path, self.step)
        return st

    # --- validation ---------------------------------------------------------------------------
    def _validate(self, end: bool) -> bool:
        """Run, log and rank one validation; False when a signal cut it short."""
        v = self.task.validate(self.stop_requested)
        if v is None:
            return False
        if not v:
            return True
        self.last_val = {k if k.startswith("val_") else f"val_{k}": float(x) for k, x in v.items()
                         if isinstance(x, (int, float))}
        self.logger.log(self.step, v, "val")
        log.info("step %d validation: %s", self.step, _fmt(v))
        hook = getattr(self.task, "on_validated", None)
        if hook is not None:
            hook(self.step, v, end)
        return True

    def _preempted(self, pending_validation: bool, m: Dict[str, float], bar: Progress) -> None:
        self.save(m, pending_validation=pending_validation)
        log.warning("preempted: checkpointed at step %d%s, exiting with %d (run again to resume)", self.step,
                    " (its validation runs after the resume)" if pending_validation else "", PREEMPTED_EXIT)
        self._close(bar)
        raise SystemExit(PREEMPTED_EXIT)

    # --- the loop -----------------------------------------------------------------------------
    def run(self) -> Dict[str, float]:
        c = self.c
        st = self.resume()
        resumed = st is not None
        self.logger = MetricsLogger(self.stage_dir, resume_step=self.step if resumed else None)
        bar = Progress(c.max_steps, initial=self.step, desc=self.name, unit=c.progress_unit,
                       log_every=max(1, c.progress_every))
        prof = StepProfiler(c.torch_profile, self.stage_dir, self.rank)
        saved_at = self.step if resumed else -1
        m: Dict[str, float] = {}
        try:
            with self.preempt:
                if c.has_validation and ((resumed and st.get("pending_validation")) or
                                         (not resumed and c.validate_at_start)):
                    if not self._validate(self.step >= c.max_steps):
                        self._preempted(True, m, bar)
                while self.step < c.max_steps:
                    prof.before(self.step + 1)
                    m = self.task.train_step(self.step)
                    self.step += 1
                    prof.after(self.step)
                    end = self.step == c.max_steps
                    if self.step % max(1, c.log_every_n_steps) == 0 or end:
                        self.logger.log(self.step, m, "train")
                    self._progress(bar, m)
                    due = c.has_validation and (every(self.step, c.val_check_interval) or end)
                    if self.stop_requested():  # the step boundary: save now, validate after the resume
                        self._preempted(due, m, bar)
                    if due and not self._validate(end):
                        self._preempted(True, m, bar)
                    if every(self.step, c.save_interval) or end:
                        self.save(m)
                        saved_at = self.step
                    if self.stop_requested():  # a signal during the save
                        if saved_at != self.step:
                            self.save(m)
                        log.warning("preempted: checkpointed at step %d, exiting with %d", self.step, PREEMPTED_EXIT)
                        self._close(bar)
                        raise SystemExit(PREEMPTED_EXIT)
        except KeyboardInterrupt:
            if saved_at != self.step and self.step > 0:
                log.warning("interrupted: checkpointing step %d", self.step)
                with contextlib.suppress(Exception):
                    self.save(m, collective=False)
            self._close(bar)
            raise
        prof.close()
        self._close(bar)
        return self.last_val

    def _progress(self, bar: Progress, m: Dict[str, float]) -> None:
        hook = getattr(self.task, "progress", None)
        samples, tokens, post = hook(m) if hook is not None else (0, 0, {})
        bar.update(samples, tokens, **post)

    def _close(self, bar: Progress) -> None:
        bar.close()
        if self.logger is not None:
            self.logger.flush()


def _fmt(m: Dict[str, float], keys: Optional[tuple] = None) -> str:
    keys = keys or tuple(m)
    return "  ".join(f"{k} {m[k]:.4g}" for k in keys if isinstance(m.get(k), (int, float)) and not
                     (isinstance(m[k], float) and math.isnan(m[k])))


def finish_policy_stage(loop: TrainingLoop, save, stage_dir: str, name: str, ckpt_dir: str, plot_keys: tuple,
                        title: str, what: str) -> Dict[str, str]:
    """The end of a stage that trains a policy (sft, dpo): rank 0 saves `{name}.nemo` through `save(path)`
    (the stage's save_nemo with its tokenizer), plots the metrics and names the data report; every rank gets
    the same artifacts back."""
    result = {"metrics": loop.logger.path, "checkpoints": ckpt_dir}
    if D.is_main():
        nemo = os.path.join(stage_dir, f"{name}.nemo")
        save(nemo)
        fix_mode(nemo)
        log.info("%s: %s", what, nemo)
        result["nemo"] = nemo
        result["plot"] = loop.logger.plot(plot_keys, title=title)
        result["report"] = os.path.join(stage_dir, "data_report.json")
    loop.logger.close()
    D.barrier()
    return D.broadcast_object(result)
