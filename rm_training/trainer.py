"""The reward-model task on engine's training loop (engine/loop.py): gradient accumulation over
length-aware micro-batches, DDP or FSDP, validation; the loop adds checkpoints (periodic, top-k, on
preemption), exact resume, profiling and metrics.

A step's global batch is fixed by (seed, epoch, batch-in-epoch), so the data position of a
checkpoint is its step; the loss of each micro-batch is sum(pair losses) * dp / global_batch_size,
so DDP's gradient average is the mean over the global batch whatever the split into micro-batches
and ranks (1 process and N processes compute the same step up to float summation order).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from engine import distributed as D
from engine.checkpointing import CheckpointManager
from engine.config import OptimConfig, typed
from engine.loop import LoopConfig, TrainingLoop, run_length
from engine.optim import build_optimizer, build_scheduler

from .data import (PackedBatch, PairDataset, collate, collate_packed, global_batches, micro_batches, pack_pairs,
                   packed_micro_batches)
from .loss import PairStats, bradley_terry_loss, pair_sums, split_rewards

log = logging.getLogger(__name__)


@dataclass
class LoopSettings:
    """The loop's knobs, read from RMConfig by the stage (kept flat so tests and benchmarks can
    build one directly)."""
    global_batch_size: int
    micro_batch_size: int
    seed: int = 1234
    max_epochs: int = 1
    max_steps: int = -1
    val_check_interval: int = 100  # steps; 0 = only at the end
    save_interval: int = 100  # steps; 0 = only at the end (and on preemption)
    limit_val_batches: float = 1.0
    gradient_clip_val: float = 1.0
    train_random_sampler: bool = True
    val_random_sampler: bool = False
    log_every_n_steps: int = 1
    length_grouping_window: int = 16
    max_micro_batch_tokens: Optional[int] = None
    pad_to_multiple: int = 8
    packing: bool = False  # sequence packing: micro-batches of <= packed_tokens tokens, no per-pair padding
    packed_tokens: int = 16384
    packed_attention: str = "auto"  # auto | varlen | flex | mask (see modeling.layers.pack_documents)
    autocast_dtype: Optional[torch.dtype] = None  # torch.bfloat16 on GPU for bf16; None = fp32
    resume: bool = True
    monitor: str = "val_loss"
    mode: str = "min"
    save_top_k: int = 3
    filename: str = "megatron_gpt--{val_loss:.3f}-{step}"
    torch_profile: Any = None  # {enabled, start_step, end_step, ranks}: see engine/profiling.py
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the ranks (FSDP2) instead of DDP


class RMTrainer:
    """The reward-model task (engine/loop.py's protocol: train_step, validate, state_dict,
    load_state_dict) and `fit()`, which runs it on the engine's loop."""

    def __init__(self, model: torch.nn.Module, optim_cfg, settings: LoopSettings, train: PairDataset,
                 val: Optional[PairDataset], pad_id: int, stage_dir: str, device: torch.device,
                 on_checkpoint: Optional[Callable[[str, bool], None]] = None,
                 on_remove: Optional[Callable[[str], None]] = None, identity: Optional[dict] = None):
        optim_cfg = typed(optim_cfg, OptimConfig)
        self.identity = identity
        self.s, self.train_ds, self.val_ds, self.pad_id = settings, train, val, pad_id
        self.device, self.stage_dir = device, stage_dir
        self.dp, self.rank = D.world_size(), D.rank()
        gbs, mbs = settings.global_batch_size, settings.micro_batch_size
        if gbs % (mbs * self.dp):
            raise ValueError(f"global_batch_size={gbs} is not divisible by micro_batch_size={mbs} x data-parallel {self.dp}")
        self.steps_per_epoch = len(train) // gbs
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(train)} training pairs do not fill one global batch of {gbs}")
        self.max_steps = run_length(settings.max_steps, settings.max_epochs, self.steps_per_epoch, "rm.trainer.rm", log)
        self.module = model.to(device)
        self.fsdp = bool(settings.fsdp) and self.dp > 1
        if self.fsdp:
            # an empty (meta) copy to rebuild a plain module from gathered weights (.nemo export)
            self._shell = copy.deepcopy(model).to("meta")
            self.model = D.shard_fsdp(self.module, grad_sync_dtype=optim_cfg.grad_sync_dtype)  # in place
            log.info("FSDP: parameters, gradients and optimizer state sharded over %d ranks", self.dp)
        else:
            self.model = D.wrap_ddp(self.module, device, grad_sync_dtype=optim_cfg.grad_sync_dtype)
        self.exportable = self.module  # what .nemo exports read (a gathered copy under FSDP)
        self.optimizer = build_optimizer(self.module, optim_cfg)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, self.max_steps)
        self.ckpt = CheckpointManager(os.path.join(stage_dir, "checkpoints"), settings.monitor, settings.mode,
                                      settings.save_top_k, settings.filename, on_remove=on_remove)
        self.on_checkpoint = on_checkpoint
        self.step = 0
        self.last_val: Dict[str, float] = {}
        self._plan_epoch, self._plan = -1, []
        self.logger = None  # the loop's MetricsLogger, after fit()

    # --- data -----------------------------------------------------------------------------------
    def global_batch(self, step: int) -> np.ndarray:
        epoch, b = divmod(step, self.steps_per_epoch)
        if epoch != self._plan_epoch:
            self._plan = global_batches(self.train_ds.lengths, self.s.global_batch_size, self.s.seed, epoch,
                                        self.s.train_random_sampler, self.s.length_grouping_window)
            self._plan_epoch = epoch
        return self._plan[b]

    def _autocast(self):
        if self.s.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.s.autocast_dtype)

    def _collate(self, ds: PairDataset, idx):
        if self.s.packing:
            return collate_packed(ds, idx, self.pad_id, max(self.s.pad_to_multiple, 128)).to(self.device)
        return collate(ds, idx, self.pad_id, self.s.pad_to_multiple).to(self.device)

    def _rewards(self, model, batch) -> torch.Tensor:
        """[c0, r0, c1, r1, ...] rewards of a padded or packed micro-batch."""
        if isinstance(batch, PackedBatch):
            from modeling.layers import pack_documents

            docs = pack_documents(batch.doc_lengths, tuple(batch.input_ids.shape), self.s.packed_attention,
                                  self.device, real=2 * batch.pairs)
            return model(batch.input_ids, documents=docs)
        return model(batch.input_ids, lengths=batch.lengths)

    # --- one optimizer step ------------------------------------------------------------------
    def train_step(self, step: int) -> Dict[str, float]:
        s = self.s
        t0 = time.perf_counter()
        self.model.train()
        if s.packing:
            mbs_list = packed_micro_batches(self.global_batch(step), self.train_ds.pair_tokens, self.dp, self.rank,
                                            s.packed_tokens)
        else:
            mbs_list = micro_batches(self.global_batch(step), self.train_ds.lengths, s.micro_batch_size, self.dp,
                                     self.rank, s.max_micro_batch_tokens)
        stats = PairStats(self.device)
        scale = self.dp / s.global_batch_size
        real = padded = 0
        n_real = len(mbs_list)
        mbs_list = self._same_pass_count(mbs_list, mbs_list[-1])  # repeats are weighted 0 below
        for i, idx in enumerate(mbs_list):
            batch = self._collate(self.train_ds, idx)
            sync = i == len(mbs_list) - 1
            if self.fsdp:
                self.model.set_requires_gradient_sync(sync)
                ctx = contextlib.nullcontext()
            else:
                ctx = self.model.no_sync() if (not sync and hasattr(self.model, "no_sync")) else contextlib.nullcontext()
            with ctx:
                with self._autocast():
                    rewards = self._rewards(self.model, batch)
                c, r = split_rewards(rewards.float())
                losses = bradley_terry_loss(c, r)
                (losses.sum() * (scale if i < n_real else 0.0)).backward()
            if i >= n_real:
                continue
            stats.add(pair_sums(c, r, losses))
            real += batch.tokens
            padded += batch.padded_tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(),
                                                   s.gradient_clip_val if s.gradient_clip_val else math.inf)
        self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        vec = torch.cat([stats.vector(), torch.tensor([real, padded], dtype=torch.float64, device=self.device)])
        if self.dp > 1:
            dist.all_reduce(vec)
        m = PairStats.metrics(vec[:-2].tolist())
        real, padded = int(vec[-2].item()), int(vec[-1].item())
        dt = time.perf_counter() - t0
        m.update(lr=lr, grad_norm=float(grad_norm), tokens=real, padding_efficiency=real / max(padded, 1),
                 pairs_per_s=m["pairs"] / dt, tokens_per_s=real / dt, step_time=dt,
                 epoch=step // self.steps_per_epoch, consumed_samples=(step + 1) * s.global_batch_size)
        if self.device.type == "cuda":
            m["peak_mem_gib"] = D.peak_memory_gib(self.device)
        self.step = step + 1
        return m

    # --- evaluation ---------------------------------------------------------------------------
    def eval_subset(self, ds: PairDataset, limit) -> np.ndarray:
        n = len(ds)
        if isinstance(limit, float) and limit <= 1.0:
            k = int(math.floor(limit * n)) if limit < 1.0 else n
        else:
            k = min(n, int(limit) * self.s.global_batch_size)
        if self.s.val_random_sampler:
            return np.sort(np.random.default_rng([self.s.seed, 7]).permutation(n)[:k])
        return np.arange(k)

    def _same_pass_count(self, parts: List, filler) -> List:
        """Under FSDP every rank must run as many forward (and backward) passes, each of which gathers
        parameters: pad this rank's list with `filler` up to the largest count over the ranks."""
        if not self.fsdp:
            return parts
        n_all = int(D.all_reduce_max(float(len(parts)), self.device))
        return list(parts) + [filler] * (n_all - len(parts))

    @torch.no_grad()
    def evaluate(self, ds: PairDataset, limit=1.0, should_stop: Optional[Callable[[], bool]] = None
                 ) -> Optional[Dict[str, float]]:
        """Metrics over the (limited) split; every rank takes its share of length-sorted micro-batches.
        `should_stop` (a collective) is polled before each micro-batch: None when it says stop."""
        self.model.eval()
        idx = self.eval_subset(ds, limit)
        idx = idx[np.argsort(ds.lengths[idx], kind="stable")]
        mbs = self.s.micro_batch_size
        if self.s.packing:  # pack a rank's share of a whole global batch at a time
            mbs = max(mbs, self.s.global_batch_size // self.dp)
        blocks = [idx[i: i + mbs] for i in range(0, len(idx), mbs)][self.rank:: self.dp]
        stats = PairStats(self.device)
        parts = [part for block in blocks
                 for part in (pack_pairs(block, ds.pair_tokens, self.s.packed_tokens) if self.s.packing else
                              micro_batches(block, ds.lengths, len(block), 1, 0, self.s.max_micro_batch_tokens))]
        n_real = len(parts)
        parts = self._same_pass_count(parts, parts[-1] if parts else idx[:1])  # the repeats are not counted
        if should_stop is not None:  # every rank polls as often: the longest share's count
            n_polls = int(D.all_reduce_max(float(len(parts)), self.device)) if self.dp > 1 else len(parts)
        for i in range(n_polls if should_stop is not None else len(parts)):
            if should_stop is not None and should_stop():
                log.warning("validation cut short by a signal (%d of %d micro-batches done)", i, len(parts))
                return None
            if i >= len(parts):
                continue
            part = parts[i]
            batch = self._collate(ds, part)
            with self._autocast():
                rewards = self._rewards(self.module, batch)
            if i < n_real:
                c, r = split_rewards(rewards.float())
                stats.add(pair_sums(c, r, bradley_terry_loss(c, r)))
        vec = stats.vector()
        if self.dp > 1:
            dist.all_reduce(vec)
        return PairStats.metrics(vec.tolist())

    # --- the task protocol (engine/loop.py) ---------------------------------------------------
    def validate(self, should_stop: Optional[Callable[[], bool]] = None) -> Optional[Dict[str, float]]:
        if self.val_ds is None or not len(self.val_ds):
            return {}
        return self.evaluate(self.val_ds, self.s.limit_val_batches, should_stop)

    def progress(self, m: Dict[str, float]):
        return m["pairs"], m["tokens"], {"loss": m["loss"], "acc": m["accuracy"]}

    def on_validated(self, step: int, v: Dict[str, float], end: bool) -> None:
        if D.is_main() and not end:  # curves on disk while it runs (the stage plots the end)
            self.loop.logger.plot(["loss", "accuracy"], title="reward model")

    def on_saved(self, path: str, is_best: bool) -> None:
        if self.on_checkpoint:
            self.on_checkpoint(path, is_best)

    def state_dict(self) -> dict:
        """Model, optimizer and scheduler; under FSDP gathered in full on the CPU (a collective)."""
        model_sd, optim_sd = self._state_dicts()
        if self.fsdp:
            self.exportable = self.export_module(model_sd)
        return {"model": model_sd, "optimizer": optim_sd, "scheduler": self.scheduler.state_dict(),
                "consumed_samples": self.step * self.s.global_batch_size}

    def load_state_dict(self, st: dict) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)
            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.module, st["model"], options=opts)
            set_optimizer_state_dict(self.module, self.optimizer, st["optimizer"], options=opts)
        else:
            self.module.load_state_dict(st["model"])
            self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.step = int(st["step"])

    def _state_dicts(self):
        """Model and optimizer state; under FSDP gathered in full (a collective: every rank calls it)
        and kept on the CPU, so checkpoints look the same whatever the sharding."""
        if not self.fsdp:
            return self.module.state_dict(), self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return self._gather_model(), get_optimizer_state_dict(self.module, self.optimizer, options=opts)

    def export_module(self, model_sd: Optional[dict] = None) -> Optional[torch.nn.Module]:
        """The module a .nemo is written from: the model itself, or under FSDP a plain CPU copy
        with the gathered weights (rank 0; a collective when model_sd is not given)."""
        if not self.fsdp:
            return self.module
        if model_sd is None:
            model_sd = self._gather_model()
        if not D.is_main():
            return None
        out = copy.deepcopy(self._shell)
        out.load_state_dict(model_sd, assign=True)
        return out

    def _gather_model(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    # --- the loop -----------------------------------------------------------------------------
    def fit(self) -> Dict[str, float]:
        """Train to max_steps on engine's loop (resuming the newest checkpoint of this config)."""
        s = self.s
        loop = TrainingLoop(self, LoopConfig(
            max_steps=self.max_steps, val_check_interval=s.val_check_interval, save_interval=s.save_interval,
            log_every_n_steps=s.log_every_n_steps, has_validation=self.val_ds is not None and len(self.val_ds) > 0,
            resume=s.resume, monitor=s.monitor, torch_profile=s.torch_profile, progress_unit="pairs",
            progress_every=max(1, s.log_every_n_steps * 10)), stage_dir=self.stage_dir, name="rm",
            checkpoints=self.ckpt, identity=self.identity, device=self.device)
        self.loop = loop
        log.info("training %d steps (%d per epoch, global batch %d pairs, micro batch %d, %d process(es)); %d train pairs",
                 self.max_steps, self.steps_per_epoch, s.global_batch_size, s.micro_batch_size, self.dp, len(self.train_ds))
        try:
            self.last_val = loop.run()
        finally:
            self.step, self.logger = loop.step, loop.logger
        return self.last_val
