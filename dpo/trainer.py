"""The DPO task on the engine's training loop (engine/loop.py's protocol); the loop adds checkpoints,
exact resume, preemption, profiling and metrics.

A step's global batch of pairs is fixed by (seed, epoch, batch-in-epoch). Each micro-batch holds whole
pairs (chosen and rejected in the same forward pass, padded or packed); its loss is
sum(pair losses) / global_batch_size and the ranks' gradients are summed, so the step is the mean over
the global batch whatever its cut. The frozen reference scores the same micro-batch without autograd
(`reference_free`: no reference, log pi_ref = 0).
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

from .data import PairSet, collate, collate_packed, global_batches, pack_pairs, rank_share, sequence_logps
from .loss import STAT_KEYS, metrics, pair_sums, preference_loss

log = logging.getLogger(__name__)


def call_stop(should_stop) -> bool:
    """The loop's stop poll (a collective when there are several ranks), or False outside the loop."""
    return bool(should_stop()) if should_stop is not None else False


@dataclass
class DPOSettings:
    global_batch_size: int
    micro_batch_size: int
    max_steps: int
    beta: float = 0.2
    preference_loss: str = "dpo"
    preference_average_log_probs: bool = False
    sft_average_log_probs: bool = False
    preference_loss_weight: float = 1.0
    sft_loss_weight: float = 0.0
    gt_reward_scale: float = 1.0
    default_chosen_reward: float = 1.0
    default_rejected_reward: float = 0.0
    seed: int = 1234
    packing: bool = False
    packed_tokens: int = 16384
    pad_to_multiple: int = 8
    packed_attention: str = "auto"
    limit_val_batches: Any = 1.0
    gradient_clip_val: float = 1.0
    autocast_dtype: Optional[torch.dtype] = None


def sync_gradients(params: List[torch.nn.Parameter]) -> None:
    """Sum the gradients over the data-parallel ranks (one flat all-reduce)."""
    if D.world_size() <= 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    for g, f in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(f)


class DPOTask:
    def __init__(self, policy: torch.nn.Module, reference: Optional[torch.nn.Module], optim_cfg, s: DPOSettings,
                 train: PairSet, val: Optional[PairSet], pad_id: int, device: torch.device):
        self.model, self.s, self.train_ds, self.val_ds = policy.to(device), s, train, val
        self.reference = reference.to(device).eval() if reference is not None else None
        if self.reference is not None:
            for p in self.reference.parameters():
                p.requires_grad_(False)
        self.pad_id, self.device = pad_id, device
        self.dp, self.rank = D.world_size(), D.rank()
        self.steps_per_epoch = len(train) // s.global_batch_size
        self.optimizer = build_optimizer(self.model, optim_cfg)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, s.max_steps)
        self._plan_epoch, self._plan = -1, []

    # --- data and forward -------------------------------------------------------------------------
    def global_batch(self, step: int) -> np.ndarray:
        epoch, b = divmod(step, self.steps_per_epoch)
        if epoch != self._plan_epoch:
            self._plan = global_batches(len(self.train_ds), self.s.global_batch_size, self.s.seed, epoch)
            self._plan_epoch = epoch
        return self._plan[b]

    def _micro_batches(self, ds: PairSet, idx: np.ndarray):
        s = self.s
        if s.packing:
            mine = rank_share(idx, ds.pair_tokens, self.dp, self.rank)
            return [collate_packed(ds, part, self.pad_id, max(s.pad_to_multiple, 128))
                    for part in pack_pairs(mine, ds.pair_tokens, s.packed_tokens)]
        mine = rank_share(idx, ds.lengths, self.dp, self.rank)
        return [collate(ds, mine[i: i + s.micro_batch_size], self.pad_id, s.pad_to_multiple)
                for i in range(0, len(mine), s.micro_batch_size)]

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.s.autocast_dtype) if self.s.autocast_dtype else \
            contextlib.nullcontext()

    def _losses(self, batch):
        """(per-pair loss, preference loss, sft loss, chosen log ratio, rejected log ratio) of a micro-batch."""
        s = self.s
        batch = batch.to(self.device)
        docs = None
        if batch.doc_lengths is not None:
            from modeling.layers import pack_documents

            docs = pack_documents(batch.doc_lengths, tuple(batch.input_ids.shape), s.packed_attention, self.device,
                                  real=2 * batch.pairs)
        same_mean = s.sft_average_log_probs == s.preference_average_log_probs
        with self._autocast():
            lp = sequence_logps(self.model, batch, s.preference_average_log_probs, docs)
            lp_sft = lp if same_mean or not s.sft_loss_weight else \
                sequence_logps(self.model, batch, s.sft_average_log_probs, docs)
            if self.reference is not None:
                with torch.no_grad():
                    ref = sequence_logps(self.reference, batch, s.preference_average_log_probs, docs)
            else:
                ref = torch.zeros_like(lp)
        ratio = lp - ref
        c, r = ratio[0::2], ratio[1::2]
        m = batch.pairs
        gc = torch.full((m,), s.default_chosen_reward, device=self.device)
        gr = torch.full((m,), s.default_rejected_reward, device=self.device)
        pref = preference_loss(c, r, s.beta, s.preference_loss, gc, gr, s.gt_reward_scale)
        sft = -lp_sft[0::2]
        return s.preference_loss_weight * pref + s.sft_loss_weight * sft, pref, sft, c, r

    def _vector(self, sums: Optional[Dict[str, torch.Tensor]]) -> torch.Tensor:
        if sums is None:
            return torch.zeros(len(STAT_KEYS), dtype=torch.float64, device=self.device)
        return torch.stack([sums[k] for k in STAT_KEYS])

    @staticmethod
    def _add(acc, new):
        return new if acc is None else {k: acc[k] + new[k] for k in acc}

    # --- the loop's protocol --------------------------------------------------------------------
    def train_step(self, step: int) -> Dict[str, float]:
        t0 = time.perf_counter()
        s = self.s
        self.model.train()
        sums, tokens, padded = None, 0, 0
        for batch in self._micro_batches(self.train_ds, self.global_batch(step)):
            loss, pref, sft, c, r = self._losses(batch)
            (loss.sum() / s.global_batch_size).backward()
            sums = self._add(sums, pair_sums(c, r, s.beta, loss, pref, sft))
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
        vec = torch.cat([self._vector(sums), torch.tensor([tokens, padded], dtype=torch.float64, device=self.device)])
        if self.dp > 1:
            dist.all_reduce(vec)
        dt = time.perf_counter() - t0
        m = metrics(vec[:-2].tolist())
        m.update(lr=lr, grad_norm=float(grad_norm), tokens=int(vec[-2]),
                 padding_efficiency=float(vec[-2]) / max(float(vec[-1]), 1.0), tokens_per_s=float(vec[-2]) / dt,
                 pairs_per_s=m["pairs"] / dt, step_time=dt, epoch=step // self.steps_per_epoch,
                 consumed_samples=(step + 1) * s.global_batch_size)
        if self.device.type == "cuda":
            m["peak_mem_gib"] = D.peak_memory_gib(self.device)
        return m

    @torch.no_grad()
    def evaluate(self, ds: PairSet, limit=1.0, should_stop=None) -> Optional[Dict[str, float]]:
        """Metrics over the (limited) split, a global batch at a time; None when `should_stop` says stop."""
        self.model.eval()
        gbs, n = self.s.global_batch_size, len(ds)
        if isinstance(limit, float) and limit <= 1.0:
            k = int(math.floor(limit * n)) if limit < 1.0 else n
        else:
            k = min(n, int(limit) * gbs)
        idx = np.arange(k)
        sums = None
        for start in range(0, len(idx), gbs):
            if call_stop(should_stop):
                return None
            for batch in self._micro_batches(ds, idx[start: start + gbs]):
                loss, pref, sft, c, r = self._losses(batch)
                sums = self._add(sums, pair_sums(c, r, self.s.beta, loss, pref, sft))
        vec = self._vector(sums)
        if self.dp > 1:
            dist.all_reduce(vec)
        return metrics(vec.tolist())

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
        return int(m.get("pairs", 0)), int(m.get("tokens", 0)), {"loss": m.get("loss", float("nan")),
                                                                  "acc": m.get("accuracy", float("nan"))}
