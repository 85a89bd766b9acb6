"""Resume only from training state written by the same config: one rule for every training stage.

The contract of every training stage (engine/loop.py applies it): a stage's identity is its config sections (for rm: `model`, `rm`, `data.tokenizer`) flattened to
dotted keys, minus the keys that may change between a run and its resumption (more steps, other
logging and checkpoint settings), plus the size and mtime of every input file the config names (a
re-run prep writes new data under the same paths). It is written to `checkpoints/identity.json`
before the first checkpoint. At the start of a stage, checkpoints written under another identity,
under none (an older kit), with `exp_manager.resume_if_exists=false`, or by another `force=true`
launch are moved aside to `checkpoints.old-<time>` and the stage starts fresh, saying which keys
changed. The identity's digest is also written into every checkpoint, and a checkpoint whose digest
differs (a file copied in from another run) is treated the same way. A `force=true` launch (`run.force_id`, set by the launcher) resumes only its own checkpoints:
a Slurm requeue of the same job keeps its work, a new `force=true` command trains from step 0.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, Dict, Iterable, List, Optional

from .io import write_json

log = logging.getLogger(__name__)
IDENTITY = "identity.json"
FORCE_KEY = "run.force_id"


def _plain(value: Any) -> Any:
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(value)
    return value


def _select(cfg, key: str) -> Any:
    """cfg's value at a dotted key (a DictConfig, dataclasses or dicts); None where absent."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        return OmegaConf.select(cfg, key)
    cur = cfg
    for part in key.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else getattr(cur, part, None)
        if cur is None:
            return None
    return cur


def _flatten(prefix: str, value: Any, out: Dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def _file_identity(value: Any) -> List[list]:
    """[path, size, mtime_ns] of each existing file a value names (a data prefix: its .bin and .idx)."""
    strings = [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)] \
        if isinstance(value, (list, tuple)) else []
    found = []
    for s in strings:
        if os.sep not in s:
            continue
        for path in (s, s + ".bin", s + ".idx"):
            if os.path.isfile(path):
                st = os.stat(path)
                found.append([path, st.st_size, st.st_mtime_ns])
    return found


def stage_identity(cfg, sections: Iterable[str], resumable: Iterable[str]) -> Dict[str, Any]:
    """{dotted key: value} of `sections` of `cfg` (dotted paths: "model", "data.tokenizer"), without
    the `resumable` keys (a key or a prefix of keys), with `<key> (files)` for the input files named."""
    flat: Dict[str, Any] = {}
    for section in sections:
        _flatten(section, _plain(_select(cfg, section)), flat)
    drop = tuple(resumable)
    flat = {k: v for k, v in flat.items() if not any(k == d or k.startswith(d + ".") for d in drop)}
    for key, value in list(flat.items()):
        files = _file_identity(value)
        if files:
            flat[f"{key} (files)"] = files
    force_id = _select(cfg, FORCE_KEY)
    if force_id:
        flat[FORCE_KEY] = str(force_id)
    return json.loads(json.dumps(flat, default=str))  # what identity.json will read back as


def digest(identity: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _has_state(ckpt_dir: str) -> bool:
    return os.path.isdir(ckpt_dir) and any(n != IDENTITY for n in os.listdir(ckpt_dir))


def _why_foreign(old: Optional[Dict[str, Any]], new: Dict[str, Any], resume: bool) -> Optional[str]:
    if not resume:
        return "exp_manager.resume_if_exists=false"
    if old is None:
        return f"they record no config ({IDENTITY} missing or unreadable)"
    if new.get(FORCE_KEY) and old.get(FORCE_KEY) != new[FORCE_KEY]:
        return "force=true: this launch trains from the start"
    old, new = ({k: v for k, v in d.items() if k != FORCE_KEY} for d in (old, new))
    changed = sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))
    if not changed:
        return None
    shown = [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in changed[:8]]
    more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
    return "written by another config: " + "; ".join(shown) + more


def prepare_checkpoint_dir(ckpt_dir: str, identity: Dict[str, Any], resume: bool, stage: str) -> Optional[str]:
    """Call on rank 0 before any checkpoint is read (then barrier). Moves foreign checkpoints aside
    and records `identity`. Returns where they were moved, or None when the folder may be resumed."""
    moved = None
    if _has_state(ckpt_dir):
        try:
            with open(os.path.join(ckpt_dir, IDENTITY), encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None
        why = _why_foreign(old, identity, resume)
        if why is not None:
            return move_aside(ckpt_dir, identity, why, stage)
    _record(ckpt_dir, identity)
    return moved


def move_aside(ckpt_dir: str, identity: Dict[str, Any], why: str, stage: str) -> str:
    """Move `ckpt_dir` to `<ckpt_dir>.old-<time>` (saying why), start it again empty under `identity`."""
    moved = _free_name(f"{ckpt_dir}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(ckpt_dir, moved)
    log.warning("%s: not resuming the checkpoints in %s (%s): moved to %s; training from step 0",
                stage, ckpt_dir, why, moved)
    _record(ckpt_dir, identity)
    return moved


def _record(ckpt_dir: str, identity: Dict[str, Any]) -> None:
    os.makedirs(ckpt_dir, exist_ok=True)
    write_json(os.path.join(ckpt_dir, IDENTITY), identity, indent=1, sort_keys=True)


def _free_name(path: str) -> str:
    n, candidate = 1, path
    while os.path.exists(candidate):
        n, candidate = n + 1, f"{path}-{n}"
    return candidate
