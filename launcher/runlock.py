"""One launch per run directory: `<run dir>/.launch.lock`, held (flock) for as long as the launch and
the stage processes it started live.

The lock is the kernel's, not the file's existence: a launch that dies, however it dies, releases it,
so a lock file left behind by a dead launch is taken over (and said so). The file says who holds it
(pid, host, start time, command), which is what a second launch prints when it refuses. The stage
processes inherit the locked descriptor, so a launcher killed with SIGKILL still keeps a second
launch out while its orphaned stages run.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Optional

from launcher.errors import ConfigError
from launcher.manifest import now

log = logging.getLogger("launcher")
LOCK_NAME = ".launch.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise ConfigError(self._refusal(holder)) from None
        before = _read(fd)
        if before.get("pid"):
            here = before.get("host") == socket.gethostname()
            state = ("no longer running" if not _alive(int(before["pid"])) else "its pid is now another process") \
                if here else f"on host {before.get('host')}"
            log.warning("%s: taking over a stale lock of launch pid %s (%s, started %s): it ended without "
                        "releasing it", self.path, before.get("pid"), state, before.get("since"))
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": now(),
                "command": " ".join(["python"] + sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def _refusal(self, holder: dict) -> list:
        who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, running since "
               f"{holder.get('since', '?')}" + (f": {holder['command']}" if holder.get("command") else ""))
        here = holder.get("host") == socket.gethostname() and holder.get("pid")
        extra = "" if not here or _alive(int(holder["pid"])) else \
            " (that launcher has exited; stage processes it started still run)"
        return [f"run.dir={self.path.parent}: another launch is running in this run directory ({who}){extra}",
                "wait for it to finish, stop it (Ctrl-C, or kill that pid), or choose another run.dir; "
                "nothing was written"]

    def release(self) -> None:
        if self.fd is None:
            return
        try:  # leave the file (an empty one): removing it would race a launch that opened it to wait
            os.ftruncate(self.fd, 0)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> dict:
    try:
        text = os.pread(fd, 65536, 0).decode(errors="replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}
