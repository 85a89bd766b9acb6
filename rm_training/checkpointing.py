"""Training-state checkpoints (generic: rm and ppo use them).

A checkpoint is one `torch.save`d dict written atomically (tmp file + rename): whatever the trainer
puts in it (model, optimizer, scheduler, step, consumed samples / data position) plus the RNG
states of python, numpy, torch and CUDA, so a resumed run continues exactly.

`CheckpointManager` keeps the newest checkpoint ("last") plus the `save_top_k` best by a monitored
metric, records them in `index.json` and finds the one to resume from. `PreemptionHandler` turns
SIGUSR1 / SIGTERM into a flag the training loop polls between steps.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import signal
import threading
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

log = logging.getLogger(__name__)
INDEX = "index.json"


# --- RNG --------------------------------------------------------------------------------------

def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # another GPU count: restore the one this rank uses
            torch.cuda.set_rng_state(cuda[torch.cuda.current_device() % len(cuda)])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# --- atomic save/load -------------------------------------------------------------------------

def save_state(path: str, state: Dict[str, Any], with_rng: bool = True) -> str:
    """torch.save `state` (+ "rng") to `path` atomically; returns the path."""
    if with_rng:
        state = dict(state, rng=rng_state())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_state(path: str, map_location="cpu", restore_rng: bool = True) -> Dict[str, Any]:
    """The dict `save_state` wrote; restores the RNG states it holds unless told not to."""
    state = torch.load(path, map_location=map_location, weights_only=False)
    if restore_rng and "rng" in state:
        set_rng_state(state["rng"])
    return state


# --- keep last + top-k ------------------------------------------------------------------------

def format_name(template: str, metrics: Dict[str, Any]) -> str:
    """NeMo/Lightning filename templates: `megatron_gpt--{val_loss:.3f}-{step}` ->
    `megatron_gpt--val_loss=0.693-step=100`. A metric not known yet renders as `nan`."""
    def sub(m):
        key, fmt = m.group(1), m.group(2) or ""
        v = metrics.get(key, float("nan"))
        try:
            return f"{key}={format(v, fmt[1:])}" if fmt else f"{key}={v}"
        except (TypeError, ValueError):
            return f"{key}={v}"
    return re.sub(r"\{([A-Za-z_][A-Za-z0-9_]*)(:[^}]*)?\}", sub, template).replace("/", "_")


class CheckpointManager:
    """Checkpoints in `directory`: the newest is always kept (resume), plus the `save_top_k` best by
    `monitor` (`mode` min | max; -1 keeps all, 0 none but the newest). `on_remove(path)` is called
    for each pruned checkpoint (to delete side files such as an exported .nemo)."""

    def __init__(self, directory: str, monitor: str = "val_loss", mode: str = "min", save_top_k: int = 3,
                 filename: str = "checkpoint-{step}", on_remove: Optional[Callable[[str], None]] = None):
        if mode not in ("min", "max"):
            raise ValueError(f"mode={mode!r}: expected min | max")
        self.dir, self.monitor, self.mode, self.k = directory, monitor, mode, int(save_top_k)
        self.filename, self.on_remove = filename, on_remove
        self.entries: List[Dict[str, Any]] = self._read_index()

    # index.json: [{step, path (basename), metric}] in save order
    def _read_index(self) -> List[Dict[str, Any]]:
        try:
            with open(os.path.join(self.dir, INDEX), encoding="utf-8") as f:
                entries = json.load(f)["checkpoints"]
        except (OSError, ValueError, KeyError):
            return []
        return [e for e in entries if os.path.exists(os.path.join(self.dir, e["path"]))]

    def _write_index(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        tmp = os.path.join(self.dir, INDEX + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"monitor": self.monitor, "mode": self.mode, "checkpoints": self.entries}, f, indent=1)
        os.replace(tmp, os.path.join(self.dir, INDEX))

    def path(self, entry: Dict[str, Any]) -> str:
        return os.path.join(self.dir, entry["path"])

    def _score(self, e) -> float:
        m = e.get("metric")
        if m is None or (isinstance(m, float) and math.isnan(m)):
            return math.inf
        return m if self.mode == "min" else -m

    def best(self) -> Optional[Dict[str, Any]]:
        scored = [e for e in self.entries if self._score(e) != math.inf]
        return min(scored, key=self._score) if scored else None

    def is_best(self, metric: Optional[float]) -> bool:
        if metric is None or math.isnan(metric):
            return False
        b = self.best()
        return b is None or self._score({"metric": metric}) <= self._score(b)

    def save(self, state: Dict[str, Any], step: int, metrics: Dict[str, Any]) -> str:
        """Write a checkpoint for `step` (metrics fill the filename; `metrics[monitor]` ranks it),
        then prune. Returns its path."""
        name = format_name(self.filename, dict(metrics, step=step)) + ".pt"
        path = save_state(os.path.join(self.dir, name), state)
        metric = metrics.get(self.monitor)
        self.entries = [e for e in self.entries if e["path"] != name]
        self.entries.append({"step": int(step), "path": name, "metric": None if metric is None else float(metric)})
        self._prune()
        self._write_index()
        return path

    def keep_set(self) -> set:
        newest = max(self.entries, key=lambda e: e["step"]) if self.entries else None
        ranked = sorted((e for e in self.entries if self._score(e) != math.inf), key=self._score)
        keep = {e["path"] for e in (ranked if self.k < 0 else ranked[: self.k])}
        if newest:
            keep.add(newest["path"])
        return keep

    def _prune(self) -> None:
        keep = self.keep_set()
        for e in [e for e in self.entries if e["path"] not in keep]:
            p = self.path(e)
            if os.path.exists(p):
                os.remove(p)
            if self.on_remove:
                self.on_remove(p)
        self.entries = [e for e in self.entries if e["path"] in keep]

    def latest(self) -> Optional[str]:
        """Path of the newest checkpoint (to resume from), or None."""
        if not self.entries:
            return None
        return self.path(max(self.entries, key=lambda e: e["step"]))


# --- preemption -------------------------------------------------------------------------------

class PreemptionHandler:
    """Context manager: while active, SIGUSR1 and SIGTERM set `.requested` (the signal number)
    instead of killing the process; the loop checks it between steps, checkpoints and exits
    (`raise SystemExit(75)`, EX_TEMPFAIL: "checkpointed, run me again"). Previous handlers come
    back on exit. Outside the main thread (signals cannot be caught there) it does nothing."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGUSR1", None), signal.SIGTERM) if s is not None)
    EXIT_CODE = 75

    def __init__(self, signals=None):
        self.signals = tuple(signals) if signals is not None else self.SIGNALS
        self.requested: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.requested is None:
            log.warning("received signal %d: will checkpoint after the current step and exit", signum)
        self.requested = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
        return False
