"""`<run dir>/manifest.json`: per stage status, job ids, times and artifacts.

Written by the launcher (plan, submission) and by the stage runner (running, result), possibly from
another node under Slurm: every update is read-modify-write under an flock and lands atomically.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

STATUSES = ("pending", "running", "succeeded", "failed", "cancelled", "skipped")
DONE = ("succeeded", "skipped")


_UMASK = os.umask(0)
os.umask(_UMASK)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are shared like any file
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def artifact_paths(value: Any) -> list:
    """Flatten an artifact value (a path, or a dict/list of paths) into path strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [p for v in value.values() for p in artifact_paths(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in artifact_paths(v)]
    return []


def artifact_exists(path: str) -> bool:
    """A path exists; a Megatron data prefix exists when its .bin and .idx do."""
    p = Path(path)
    return p.exists() or (Path(f"{path}.bin").exists() and Path(f"{path}.idx").exists())


class Manifest:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "manifest.json"

    def read(self) -> Dict[str, Any]:
        if not self.path.exists():
            return {"stages": {}}
        with open(self.path) as f:
            return json.load(f)

    def stage(self, name: str) -> Dict[str, Any]:
        return self.read()["stages"].get(name, {})

    @contextlib.contextmanager
    def _locked(self) -> Iterator[Dict[str, Any]]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / ".manifest.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self.read()
            yield data
            data["updated"] = now()  # any change to the run moves it
            atomic_write_text(self.path, json.dumps(data, indent=2, sort_keys=False) + "\n")

    def update_stage(self, name: str, **fields: Any) -> Dict[str, Any]:
        with self._locked() as data:
            entry = data["stages"].setdefault(
                name, {"status": "pending", "job_ids": [], "started": None, "finished": None, "artifacts": {}}
            )
            for key, value in fields.items():
                if key == "status" and value not in STATUSES:
                    raise ValueError(f"unknown stage status {value!r}")
                entry[key] = value
            return dict(entry)

    def record_command(self, argv: Optional[list] = None) -> None:
        with self._locked() as data:
            data["command"] = " ".join(argv if argv is not None else ["python"] + sys.argv)
            data.setdefault("created", now())
            data["updated"] = now()

    def is_up_to_date(self, name: str, fingerprint: str) -> bool:
        entry = self.stage(name)
        if entry.get("status") not in DONE or entry.get("fingerprint") != fingerprint:
            return False
        paths = artifact_paths(entry.get("artifacts", {}))
        return bool(paths) and all(artifact_exists(p) for p in paths)
