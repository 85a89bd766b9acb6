"""A tqdm progress bar over optimizer steps with throughput (every training stage uses it).

    bar = Progress(total_steps, initial=start_step, desc="rm")
    bar.update(pairs=64, tokens=20_000, loss=0.61, acc=0.7)   # once per step
    bar.close()

tqdm gives steps/s and the ETA; the postfix adds samples/s and tokens/s over the last `window`
steps. Disabled on ranks other than 0, and when the output is not a terminal it prints a plain
line every `log_every` steps instead (so log files stay readable).
"""
from __future__ import annotations

import collections
import logging
import sys
import time
from typing import Optional

from . import distributed

log = logging.getLogger(__name__)


class Progress:
    def __init__(self, total: int, initial: int = 0, desc: str = "train", unit: str = "pairs",
                 enabled: Optional[bool] = None, window: int = 20, log_every: int = 10):
        self.enabled = distributed.is_main() if enabled is None else enabled
        self.total, self.step, self.unit, self.log_every = total, initial, unit, max(1, log_every)
        self._hist = collections.deque(maxlen=window)  # (time, samples, tokens)
        self._t0 = time.perf_counter()
        self._start_step = initial
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def rates(self):
        """(samples/s, tokens/s) over the window."""
        if len(self._hist) < 2:
            return 0.0, 0.0
        t0, _, _ = self._hist[0]
        t1 = self._hist[-1][0]
        dt = max(t1 - t0, 1e-9)
        samples = sum(h[1] for h in list(self._hist)[1:])
        tokens = sum(h[2] for h in list(self._hist)[1:])
        return samples / dt, tokens / dt

    def update(self, samples: int = 0, tokens: int = 0, **fields) -> None:
        self.step += 1
        if not self._hist:
            self._hist.append((self._t0, 0, 0))
        self._hist.append((time.perf_counter(), samples, tokens))
        if not self.enabled:
            return
        sps, tps = self.rates()
        post = {f"{self.unit}/s": f"{sps:.1f}", "tok/s": f"{tps:.0f}"}
        post.update({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in fields.items()})
        if self.bar is not None:
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
        elif self.step % self.log_every == 0 or self.step == self.total:
            done = self.step - self._start_step
            elapsed = time.perf_counter() - self._t0
            eta = elapsed / max(done, 1) * (self.total - self.step)
            log.info("step %d/%d  %s  eta %s", self.step, self.total,
                     "  ".join(f"{k} {v}" for k, v in post.items()), _hms(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"
