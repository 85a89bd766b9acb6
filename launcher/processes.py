"""Stage processes as the launcher starts and watches them: the runner's command line, how many
processes a stage gets, their logs, and waiting for them (exit codes, the signal that ended one, its
peak memory). Shared by the local executor and the Slurm module, which import this and not each other."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from launcher.stages import REGISTRY

REPO_ROOT = Path(__file__).resolve().parent.parent


def kit_checkout() -> Optional[Path]:
    """The checkout this launcher runs from, put first on the stage processes' PYTHONPATH: they run the
    code that planned them, whatever the working directory and whichever copy of the kit pip installed
    (none, or another checkout). None when the kit itself is an installed package."""
    return REPO_ROOT if (REPO_ROOT / "pyproject.toml").exists() else None


def runner_argv(run_dir: Path, stage: str) -> List[str]:
    return [sys.executable, "-m", "launcher.stage_runner", "--run-dir", str(run_dir), "--stage", stage]


def processes_per_node(cluster, stage: Optional[str] = None) -> int:
    """One process per GPU (or `processes_per_node` on the CPU); one for a stage that is not distributed."""
    if stage is not None and not REGISTRY[stage].distributed:
        return 1
    return cluster.processes_per_node if cluster.processes_per_node is not None else max(1, cluster.gpus_per_node)


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "".join(Path(path).read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except FileNotFoundError:
        return "(no log)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_log(stage_dir: Path, rank: int) -> Path:
    return stage_dir / ("log.txt" if rank == 0 else f"log_rank{rank}.txt")


def pump(proc: subprocess.Popen, logfile: Path, echo: bool) -> None:
    with open(logfile, "ab") as f:
        for line in iter(proc.stdout.readline, b""):
            f.write(line)
            f.flush()
            if echo:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()


def exit_status(code: int) -> int:
    """A process's status as a shell reports it: 128+N for one killed by signal N (Popen says -N)."""
    return 128 - code if code < 0 else code


@dataclass
class Ended:
    codes: List[int]  # Popen's: -N for a process killed by signal N
    first: Optional[int]  # the rank that failed first; None: all succeeded
    peak_rss_kib: List[int]  # each process's peak resident memory (ru_maxrss of it and its children)


def oom_kills() -> Optional[int]:
    """The kernel's count of out-of-memory kills in this cgroup (cgroup v2), None where unreadable."""
    try:
        for line in Path("/sys/fs/cgroup/memory.events").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return None


def wait_all(procs: List[subprocess.Popen]) -> Ended:
    """Wait for every process; if one fails, stop the others (a dead rank would hang the rest).
    Reaped with wait4, which also says how much memory each used at its peak."""
    stopping = False
    first = None
    peaks = [0] * len(procs)
    while True:
        for r, p in enumerate(procs):
            if p.returncode is not None:
                continue
            try:
                pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere
                p.poll()
                continue
            if pid:
                p.returncode = os.waitstatus_to_exitcode(status)
                peaks[r] = usage.ru_maxrss
        codes = [p.returncode for p in procs]
        if first is None:
            first = next((r for r, c in enumerate(codes) if c not in (None, 0)), None)
        if all(c is not None for c in codes):
            return Ended(codes, first, peaks)
        if not stopping and first is not None:
            stopping = True
            for p in procs:
                if p.returncode is None:
                    p.send_signal(signal.SIGTERM)
        time.sleep(0.1)


def stop(procs: List[subprocess.Popen], sig: int = signal.SIGINT, grace: float = 30.0) -> None:
    """Signal every live process, give them `grace` seconds to save and exit, then kill."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    deadline = time.time() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
