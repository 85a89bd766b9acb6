"""The SFT task on the engine's training loop (engine/loop.py: train_step, validate, state_dict,
load_state_dict); the loop adds checkpoints, exact resume, preemption, profiling and metrics.

A step's global batch is fixed by (seed, epoch, batch-in-epoch), so the step is the data position. Its
loss is the mean NLL over all target tokens of the global batch: each micro-batch adds
sum(nll) / targets(global batch) to the gradient, and the ranks' gradients are summed, so 1 process
and N processes, padded and packed micro-batches, compute the same step (up to float summation order).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from engine import distributed as D
from engine.optim import build_optimizer, build_scheduler

from .data import SFTDataset, collate, collate_packed, global_batches, pack_samples, rank_share
from .loss import batch_nll_sum, perplexity

log = logging.getLogger(__name__)


def call_stop(should_stop) -> bool:
    """The loop's stop poll (a collective when there are several ranks), or False outside the loop."""
    return bool(should_stop()) if should_stop is not None else False


@dataclass
class SFTSettings:
    global_batch_size: int
    micro_batch_size: int
    max_steps: int
    seed: int = 1234
    shuffle: bool = True
    drop_last: bool = True
    packed_sequence: bool = False
    packed_tokens: int = 16384
    val_global_batch_size: int = 128
    val_micro_batch_size: int = 1
    val_packed_sequence: bool = False
    val_packed_tokens: int = 16384
    limit_val_batches: Any = 1.0
    gradient_clip_val: float = 1.0
    autocast_dtype: Optional[torch.dtype] = None
    packed_attention: str = "auto"
    pad_to_multiple: int = 8


def sync_gradients(params: List[torch.nn.Parameter]) -> None:
    """Sum the gradients over the data-parallel ranks (each rank's loss is already scaled to its
    share of the global mean), one flat all-reduce."""
    if D.world_size() <= 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    for g, f in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(f)


class SFTTask:
    def __init__(self, model: torch.nn.Module, optim_cfg, s: SFTSettings, train: SFTDataset,
                 val: Optional[SFTDataset], pad_id: int, device: torch.device):
        self.model, self.s, self.train_ds, self.val_ds = model.to(device), s, train, val
        self.pad_id, self.device = pad_id, device
        self.dp, self.rank = D.world_size(), D.rank()
        self.steps_per_epoch = len(global_batches(len(train), s.global_batch_size, s.seed, 0, s.shuffle, s.drop_last))
        self.optimizer = build_optimizer(self.model, optim_cfg)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, s.max_steps)
        self._plan_epoch, self._plan = -1, []

    # --- data -----------------------------------------------------------------------------------
    def global_batch(self, step: int) -> np.ndarray:
        epoch, b = divmod(step, self.steps_per_epoch)
        if epoch != self._plan_epoch:
            self._plan = global_batches(len(self.train_ds), self.s.global_batch_size, self.s.seed, epoch,
                                        self.s.shuffle, self.s.drop_last)
            self._plan_epoch = epoch
        return self._plan[b]

    def _micro_batches(self, ds: SFTDataset, idx: np.ndarray, packed: bool, mbs: int, packed_tokens: int):
        mine = rank_share(idx, ds.lengths, self.dp, self.rank)
        if packed:
            return [collate_packed(ds, part, self.pad_id, max(self.s.pad_to_multiple, 128))
                    for part in pack_samples(mine, ds.lengths, packed_tokens)]
        return [collate(ds, mine[i: i + mbs], self.pad_id, self.s.pad_to_multiple) for i in range(0, len(mine), mbs)]

    def _nll(self, batch):
        batch = batch.to(self.device)
        docs = None
        if batch.doc_lengths is not None:
            from modeling.layers import pack_documents

            docs = pack_documents(batch.doc_lengths, tuple(batch.input_ids.shape), self.s.packed_attention,
                                  self.device, real=batch.samples)
        ctx = torch.autocast(self.device.type, dtype=self.s.autocast_dtype) if self.s.autocast_dtype else \
            contextlib.nullcontext()
        with ctx:
            return batch_nll_sum(self.model, batch.input_ids, batch.target_mask, docs)

    # --- the loop's protocol --------------------------------------------------------------------
    def train_step(self, step: int) -> Dict[str, float]:
        t0 = time.perf_counter()
        s = self.s
        self.model.train()
        idx = self.global_batch(step)
        total = max(int(self.train_ds.targets[idx].sum()), 1)  # every rank knows the global count
        nll = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = padded = 0
        for batch in self._micro_batches(self.train_ds, idx, s.packed_sequence, s.micro_batch_size, s.packed_tokens):
            loss_sum, _ = self._nll(batch)
            (loss_sum / total).backward()
            nll += loss_sum.detach().double()
            tokens += batch.tokens
            padded += batch.padded_tokens
        params = [p for p in self.model.parameters() if p.requires_grad]
        sync_gradients(params)
        clip = s.gradient_clip_val if s.gradient_clip_val and s.gradient_clip_val > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        vec = torch.tensor([float(nll), tokens, padded], dtype=torch.float64, device=self.device)
        if self.dp > 1:
            dist.all_reduce(vec)
        dt = time.perf_counter() - t0
        loss = float(vec[0]) / total
        m = {"loss": loss, "perplexity": perplexity(loss), "lr": lr, "grad_norm": float(grad_norm),
             "samples": len(idx), "target_tokens": total, "tokens": int(vec[1]),
             "padding_efficiency": float(vec[1]) / max(float(vec[2]), 1.0), "tokens_per_s": float(vec[1]) / dt,
             "step_time": dt, "epoch": step // self.steps_per_epoch,
             "consumed_samples": (step + 1) * s.global_batch_size}
        if self.device.type == "cuda":
            m["peak_mem_gib"] = D.peak_memory_gib(self.device)
        return m

    def eval_indices(self, ds: SFTDataset, limit) -> np.ndarray:
        n = len(ds)
        if isinstance(limit, float) and limit <= 1.0:
            return np.arange(int(math.floor(limit * n)) if limit < 1.0 else n)
        return np.arange(min(n, int(limit) * self.s.val_global_batch_size))

    @torch.no_grad()
    def evaluate(self, ds: SFTDataset, limit=1.0, should_stop=None) -> Optional[Dict[str, float]]:
        """Token-mean NLL over the (limited) split; None when `should_stop` says stop (every rank
        polls it as often: once per validation global batch)."""
        self.model.eval()
        s = self.s
        idx = self.eval_indices(ds, limit)
        nll, count = 0.0, 0
        for start in range(0, len(idx), s.val_global_batch_size):
            if call_stop(should_stop):
                return None
            block = idx[start: start + s.val_global_batch_size]
            for batch in self._micro_batches(ds, block, s.val_packed_sequence, s.val_micro_batch_size,
                                             s.val_packed_tokens):
                loss_sum, n = self._nll(batch)
                nll += float(loss_sum)
                count += int(n)
        tot = D.all_reduce_sum({"nll": nll, "n": float(count)}, self.device) if self.dp > 1 else {"nll": nll, "n": count}
        loss = tot["nll"] / max(tot["n"], 1.0)
        return {"loss": loss, "perplexity": perplexity(loss), "target_tokens": int(tot["n"]), "samples": len(idx)}

    def validate(self, should_stop=None) -> Optional[Dict[str, float]]:
        if self.val_ds is None or not len(self.val_ds):
            return {}
        return self.evaluate(self.val_ds, self.s.limit_val_batches, should_stop)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def progress(self, m: Dict[str, float]):
        return int(m.get("samples", 0)), int(m.get("tokens", 0)), {"loss": m.get("loss", float("nan"))}
