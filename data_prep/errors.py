"""What makes the prep stage fail for a reason the user can act on: said in one message that names
the file (and the key that changes it), never a traceback.

`user_facing = True` tells a runner (the launcher's stage_runner, `python -m data_prep`) to log the
message alone: the traceback would show only the kit's own frames.
"""
from __future__ import annotations

import errno
import logging
import os
import re
from typing import Optional

log = logging.getLogger(__name__)

# write errors that mean "the disk (or the quota, or the file size limit) is full"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_TMP = re.compile(r"\.tmp-(\d+)$")


class PrepError(RuntimeError):
    """Input that cannot make a model, or a full disk: the stage fails with this message."""

    user_facing = True


def disk_full(e: BaseException, out_dir: str) -> Optional[PrepError]:
    """A PrepError "no space left on <path>" for a full-disk OSError, else None."""
    if not isinstance(e, OSError) or e.errno not in DISK_FULL:
        return None
    where = os.path.dirname(e.filename) if isinstance(e.filename, str) else out_dir
    why = ("a file reached the process's file size limit (ulimit -f)" if e.errno == errno.EFBIG
           else os.strerror(e.errno))
    return PrepError(f"no space left on {where or out_dir} ({why}); nothing half-written was kept. Free space "
                     f"there or point run.dir at a larger disk, and run the same command again")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def clean_stale_tmp(folder: str) -> list:
    """Remove `*.tmp-PID` files of processes that are gone (a prep killed mid-write); a live
    process's are left alone. Returns the names removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for name in sorted(names):
        m = _TMP.search(name)
        if not m or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        path = os.path.join(folder, name)
        if os.path.isfile(path) and not os.path.islink(path):
            size = os.path.getsize(path)
            remove_quietly(path)
            removed.append(name)
            log.info("removed %s (%d bytes): left by process %s, which is gone", path, size, m.group(1))
    return removed
