"""torch.profiler traces of a few optimizer steps, per rank (every training stage's, through engine/loop.py).

    prof = StepProfiler(cfg.torch_profile, stage_dir, rank)     # enabled, start_step, end_step, ranks
    for step in ...:                                            # 1-based optimizer step numbers
        prof.before(step); train_step(); prof.after(step)
    prof.close()

Writes `<stage_dir>/profile/rank<R>_steps<A>-<B>.json` (a Chrome trace: chrome://tracing or
ui.perfetto.dev) and `.txt` (the top operators by GPU time, else CPU time) for each traced rank.
The trace shows what the step-time figures cannot: GPU idle gaps (host-bound work), kernels, and,
across ranks, which rank the others wait for at the gradient all-reduce.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch

from .config import TorchProfileConfig, typed

log = logging.getLogger(__name__)


class StepProfiler:
    def __init__(self, cfg: Any, stage_dir: str, rank: int = 0):
        c = typed(cfg, TorchProfileConfig)
        self.enabled = bool(c.enabled) and rank in list(c.ranks)
        self.start, self.end = int(c.start_step), int(c.end_step)
        if c.enabled and not 1 <= self.start <= self.end:
            raise ValueError(f"torch_profile: need 1 <= start_step <= end_step, got {self.start}..{self.end}")
        self.dir, self.rank = os.path.join(stage_dir, "profile"), rank
        self._prof: Optional[torch.profiler.profile] = None

    def before(self, step: int) -> None:
        if self.enabled and step == self.start and self._prof is None:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=acts, record_shapes=False)
            self._prof.__enter__()

    def after(self, step: int) -> None:
        if self._prof is not None and step >= self.end:
            self.close()

    def close(self) -> Optional[str]:
        """Stop and write the trace (also when training ended before end_step)."""
        if self._prof is None:
            return None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        os.makedirs(self.dir, exist_ok=True)
        base = os.path.join(self.dir, f"rank{self.rank}_steps{self.start}-{self.end}")
        prof.export_chrome_trace(base + ".json")
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        with open(base + ".txt", "w") as f:
            f.write(prof.key_averages().table(sort_by=sort, row_limit=40))
        log.info("profile of steps %d-%d (rank %d): %s.json (Chrome trace), %s.txt", self.start, self.end,
                 self.rank, base, base)
        return base + ".json"
