"""Metrics to disk (every training stage uses it): JSONL rows, TensorBoard event files and a PNG plot.

    logger = MetricsLogger(stage_dir)                 # rank 0 writes; other ranks get a no-op logger
    logger.log(step, {"loss": 0.69, "accuracy": 0.5}, split="train")
    logger.plot(["loss", "accuracy"])                 # -> <stage_dir>/metrics.png
    logger.close()

Rows look like {"step": 10, "split": "train", "time": 1712345678.9, "loss": 0.69, ...}. Opened with
`resume_step`, rows past that step (written by the interrupted run after its last checkpoint)
are dropped first, so the file matches what the resumed run will log.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Dict, Iterable, List, Optional, Sequence

from . import distributed
from .io import atomic_write, write_lines

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, stage_dir: str, enabled: Optional[bool] = None, resume_step: Optional[int] = None,
                 filename: str = "metrics.jsonl", tensorboard: bool = True):
        self.enabled = distributed.is_main() if enabled is None else enabled
        self.dir = os.path.abspath(stage_dir)
        self.path = os.path.join(self.dir, filename)
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(self.dir, exist_ok=True)
        if resume_step is not None:
            self._truncate(resume_step)
        elif os.path.exists(self.path):
            os.remove(self.path)  # a fresh run starts a fresh file
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                tb_dir = os.path.join(self.dir, "tensorboard")
                # purge_step drops events past the resume point, as the JSONL truncation does
                self._tb = SummaryWriter(tb_dir, purge_step=None if resume_step is None else resume_step + 1)
            except Exception as e:  # noqa: BLE001 - metrics must never stop training
                log.warning("TensorBoard disabled: %s", e)

    def _truncate(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        keep = [r for r in self.rows() if r.get("step", 0) <= step]
        write_lines(self.path, (json.dumps(r) for r in keep))

    def log(self, step: int, values: Dict[str, float], split: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "split": split, "time": round(time.time(), 3)}
        row.update({k: _plain(v) for k, v in values.items()})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "split", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{split}/{k}", v, step)

    def rows(self, split: Optional[str] = None) -> List[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return [r for r in rows if split is None or r.get("split") == split]

    def plot(self, keys: Sequence[str] = ("loss", "accuracy"), splits: Iterable[str] = ("train", "val"),
             path: Optional[str] = None, title: Optional[str] = None) -> Optional[str]:
        """One panel per key, a line per split, x = step; returns the PNG path (rank 0), else None."""
        if not self.enabled:
            return None
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        path = path or os.path.join(self.dir, "metrics.png")
        rows = self.rows()
        ncols = min(3, len(keys))  # wrap into rows of three: a long single row is unreadable
        nrows = -(-len(keys) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
        for ax in axes.flat[len(keys):]:
            ax.set_visible(False)
        for ax, key in zip(axes.flat, keys):
            for split in splits:
                # a split's row may prefix its keys (ppo's val rows: val_reward_mean for reward_mean)
                pts = [(r["step"], r.get(key, r.get(f"{split}_{key}"))) for r in rows if r.get("split") == split]
                pts = [(x, y) for x, y in pts if isinstance(y, (int, float))]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, label=split)
            ax.set_xlabel("step")
            ax.set_title(key)
            ax.grid(alpha=0.3)
            ax.legend()
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        with atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=100)
        plt.close(fig)
        return path

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    return v
