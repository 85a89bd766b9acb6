"""Training-state checkpoints, for every training stage.

A checkpoint is one `torch.save`d dict written atomically (engine/io.py): whatever the task puts in
it (model, optimizer, scheduler, step, data position) plus the RNG states of python, numpy, torch
and CUDA, so a resumed run continues exactly. It holds only tensors and plain values, and is read
back with `torch.load(weights_only=True)`: a file that needs anything else to unpickle (a crafted
.pt runs code that way) is refused, never executed.

`CheckpointManager` keeps the newest checkpoint ("last") plus the `save_top_k` best by a monitored
metric (-1: every checkpoint, NeMo's meaning), records them in `index.json` and finds the one to
resume from.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import re
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from .io import atomic_write, write_json
from .preemption import PREEMPTED_EXIT, PreemptionHandler  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)
INDEX = "index.json"


# --- RNG --------------------------------------------------------------------------------------

def rng_state() -> Dict[str, Any]:
    """Plain values and tensors only (numpy's state as a dict, its key a list of ints), so a
    checkpoint loads with weights_only=True."""
    np_state = np.random.get_state(legacy=False)
    np_state = dict(np_state, state=dict(np_state["state"], key=np_state["state"]["key"].tolist()))
    state = {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    nps = state["numpy"]
    if isinstance(nps, dict):
        nps = dict(nps, state=dict(nps["state"], key=np.asarray(nps["state"]["key"], dtype=np.uint32)))
    np.random.set_state(nps)
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
    with atomic_write(path) as tmp:
        torch.save(state, tmp)
    return path


class UnsafeCheckpointError(ValueError):
    """A checkpoint that holds more than tensors and plain values: loading it could run code."""


def _safe_globals() -> list:
    """What an older kit's checkpoints hold besides tensors: numpy's RNG state (an array)."""
    out = [np.ndarray, np.dtype]
    multiarray = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray
    out.append(multiarray._reconstruct)
    out.extend({type(np.dtype(np.uint32))})
    return out


def load_state(path: str, map_location="cpu", restore_rng: bool = True) -> Dict[str, Any]:
    """The dict `save_state` wrote; restores the RNG states it holds unless told not to."""
    import pickle

    try:
        with torch.serialization.safe_globals(_safe_globals()):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path}: refusing to load this checkpoint: it holds objects other than tensors and plain values, "
            f"which could run code when unpickled ({str(e).splitlines()[0]}). Move it out of {os.path.dirname(path)} "
            "(or set exp_manager.resume_if_exists=false) to train from the start") from None
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
        write_json(os.path.join(self.dir, INDEX),
                   {"monitor": self.monitor, "mode": self.mode, "checkpoints": self.entries}, indent=1)

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
        if self.k < 0:  # NeMo/PTL: save_top_k=-1 keeps every checkpoint, ranked or not
            return {e["path"] for e in self.entries}
        ranked = sorted((e for e in self.entries if self._score(e) != math.inf), key=self._score)
        keep = {e["path"] for e in ranked[: self.k]}
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
