"""Atomic file writes: every output of a training stage appears whole or not at all.

    with atomic_write(path) as tmp:   # write to `tmp` (any writer: open, torch.save, savefig, tarfile)
        torch.save(state, tmp)
    write_json(path, obj)             # the common case
    write_text(path, text)

The temporary file sits beside the target (same filesystem, so the rename is atomic), is named
`.<name>.tmp-<pid>` (a killed writer's leftovers are recognisable), and is removed if the writer
raises. The result gets the permissions a plain `open()` would give it (0666 minus the umask),
whatever the writer used for the temporary file (mkstemp makes 0600).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from typing import Any, Iterator


def default_mode() -> int:
    """0666 minus the process umask: what open(path, "w") creates."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def tmp_path(path: str) -> str:
    d, name = os.path.split(os.path.abspath(path))
    root, ext = os.path.splitext(name)
    # keep the extension last: writers that pick a format by suffix (savefig, tarfile) still do
    return os.path.join(d, f".{root}.tmp-{os.getpid()}{ext}")


def fix_mode(path: str) -> None:
    """Give `path` the umask's permissions (a file written by mkstemp or copied from 0600 elsewhere)."""
    os.chmod(path, default_mode())


@contextlib.contextmanager
def atomic_write(path: str) -> Iterator[str]:
    """Yields a temporary path to write; on success it replaces `path` (permissions from the umask)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tmp_path(path)
    try:
        try:
            yield tmp
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            raise disk_full_error(e, path, parent) or e
        fix_mode(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


LOW_DISK = 2 ** 30  # below this much free space, a failed write is reported as the full disk it most likely is


def disk_full_error(e: BaseException, path: str, parent: str):
    """An OSError that says the disk is full (where, how much is left, what to do), or None."""
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        return None
    if not (isinstance(e, OSError) and e.errno == errno.ENOSPC) and free >= LOW_DISK:
        return None
    err = OSError(errno.ENOSPC, f"writing {path} failed ({type(e).__name__}: {str(e)[:200]}): the disk holding "
                                f"{parent} has {free / 2**20:.0f} MiB free. Free space there (old runs, checkpoints) "
                                "or point run.dir at a larger disk, then run the same command again")
    err.__cause__ = e
    return err


def write_text(path: str, text: str) -> str:
    with atomic_write(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return path


def write_json(path: str, obj: Any, indent: int = 2, **kw) -> str:
    return write_text(path, json.dumps(obj, indent=indent, **kw))


def write_lines(path: str, lines) -> str:
    """One string per line (JSONL)."""
    with atomic_write(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line if line.endswith("\n") else line + "\n")
    return path
