"""Executors run a plan's jobs. Local runs live here; every Slurm specific lives in launcher/slurm.py."""
from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from launcher.manifest import Manifest, atomic_write_text, now
from launcher.plan import StageJob, stage_config_for_run
from launcher.stages import EX_TEMPFAIL, REGISTRY

log = logging.getLogger("launcher")
REPO_ROOT = Path(__file__).resolve().parent.parent


def kit_checkout() -> Optional[Path]:
    """The checkout this launcher runs from, put first on the stage processes' PYTHONPATH: they run the
    code that planned them, whatever the working directory and whichever copy of the kit pip installed
    (none, or another checkout). None when the kit itself is an installed package."""
    return REPO_ROOT if (REPO_ROOT / "pyproject.toml").exists() else None


def runner_argv(job: StageJob) -> List[str]:
    return [sys.executable, "-m", "launcher.stage_runner", "--run-dir", str(job.run_dir), "--stage", job.stage]


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalExecutor:
    """Runs each stage in subprocesses on this machine, one per GPU (or one on the CPU).

    Logs go to <stage>/log.txt (rank 0, also streamed to the terminal) and log_rank<N>.txt.
    """

    name = "local"

    def __init__(self, cluster):
        self.cluster = cluster

    def _rank_envs(self, stage: str, port: int) -> List[Dict[str, str]]:
        base = {k: str(v) for k, v in self.cluster.env.items()}
        base["PYTHONUNBUFFERED"] = "1"
        checkout = kit_checkout()
        if checkout and "PYTHONPATH" not in base:
            base["PYTHONPATH"] = os.pathsep.join([str(checkout)] + ([os.environ["PYTHONPATH"]]
                                                                    if os.environ.get("PYTHONPATH") else []))
        nproc = processes_per_node(self.cluster, stage)
        if nproc == 1:
            return [base]
        common = dict(base, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc))
        return [dict(common, RANK=str(r), LOCAL_RANK=str(r)) for r in range(nproc)]

    def _command(self, job: StageJob) -> List[str]:
        argv = runner_argv(job)
        if self.cluster.setup:
            script = "; ".join(list(self.cluster.setup) + ["exec " + shlex.join(argv)])
            return ["bash", "-c", script]
        return argv

    def render(self, job: StageJob) -> str:
        """The exact commands this executor would run, as a shell script."""
        envs = self._rank_envs(job.stage, port=29500)
        lines = ["#!/usr/bin/env bash", f"# rlhf-kit: stage '{job.stage}' of run '{job.cfg.run.name}', local, "
                 f"{len(envs)} process(es)", "set -euo pipefail", f"cd {shlex.quote(os.getcwd())}"]
        for rank, env in enumerate(envs):
            exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
            amp = " &" if len(envs) > 1 else ""
            lines.append(f"{exports} {shlex.join(self._command(job))}{amp}")
        if len(envs) > 1:
            lines.append("wait")
        return "\n".join(lines) + "\n"

    def run(self, jobs: List[StageJob], manifest: Manifest) -> int:
        """Run the jobs in order; stop at the first that does not succeed. Returns an exit code."""
        for job in jobs:
            code = self._run_one(job, manifest)
            if code != 0:
                for later in jobs[jobs.index(job) + 1:]:
                    log.info("stage %s not started: %s did not succeed", later.stage, job.stage)
                return code
        return 0

    def _run_one(self, job: StageJob, manifest: Manifest) -> int:
        job.stage_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(job.config_path, stage_config_for_run(job))
        atomic_write_text(job.stage_dir / "launch.sh", self.render(job))
        manifest.update_stage(job.stage, status="pending", job_ids=[], started=None, finished=None,
                              fingerprint=job.fingerprint, artifacts={}, error=None, executor="local")
        envs = self._rank_envs(job.stage, _free_port())
        log.info("stage %s: running (%d process%s), log: %s", job.stage, len(envs), "" if len(envs) == 1 else "es",
                 job.stage_dir / "log.txt")
        procs: List[subprocess.Popen] = []
        pumps: List[threading.Thread] = []
        for rank, env in enumerate(envs):
            logfile = _rank_log(job.stage_dir, rank)
            p = subprocess.Popen(self._command(job), env={**os.environ, **env}, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, cwd=os.getcwd())
            procs.append(p)
            t = threading.Thread(target=_pump, args=(p, logfile, rank == 0), daemon=True)
            t.start()
            pumps.append(t)
        manifest.update_stage(job.stage, job_ids=[str(p.pid) for p in procs])
        try:
            codes, first = _wait_all(procs)
        except KeyboardInterrupt:
            log.warning("interrupted: stopping stage %s", job.stage)
            _stop(procs)
            for t in pumps:
                t.join(timeout=5)
            manifest.update_stage(job.stage, status="cancelled", finished=now(), error="interrupted (Ctrl-C)")
            return 130
        for t in pumps:
            t.join(timeout=10)
        entry = manifest.stage(job.stage)
        # the rank that failed first is the cause; the others were stopped because of it
        code = codes[first] if first is not None else 0
        if code == 0 and entry.get("status") == "succeeded":
            log.info("stage %s: succeeded; artifacts: %s", job.stage, ", ".join(entry.get("artifacts", {})))
            return 0
        if code == EX_TEMPFAIL and entry.get("status") == "pending":
            # the stage checkpointed on a signal (SIGTERM/SIGUSR1): stopped, and resumable from here
            note = entry.get("requeue_note") or "checkpointed on a signal"
            manifest.update_stage(job.stage, status="cancelled", finished=now(), error=note)
            log.warning("stage %s: stopped after saving a checkpoint; the same command resumes it", job.stage)
            return code
        if entry.get("status") in ("pending", "running", "succeeded") or first:
            # the process died without recording why (killed, out of memory...), or a rank other than 0
            # failed (only rank 0 writes the manifest; stopped by the launcher, it records a cancel)
            reason = f"exit code {code}" if code >= 0 else f"killed by signal {-code}"
            if len(procs) > 1 and first is not None:
                reason = f"rank {first}: {reason}" + ("; the other ranks were stopped" if any(
                    c != 0 for r, c in enumerate(codes) if r != first) else "")
            manifest.update_stage(job.stage, status="failed", finished=now(), error=reason)
        entry = manifest.stage(job.stage)
        logfile = _rank_log(job.stage_dir, first or 0)
        if first:  # only rank 0's output reaches the console: show the end of the failed rank's log
            log.error("the end of %s:\n%s", logfile, log_tail(logfile).rstrip())
        log.error("stage %s: %s (%s); its log: %s", job.stage, entry.get("status"), entry.get("error"), logfile)
        return code or 1


def _rank_log(stage_dir: Path, rank: int) -> Path:
    return stage_dir / ("log.txt" if rank == 0 else f"log_rank{rank}.txt")


def _pump(proc: subprocess.Popen, logfile: Path, echo: bool) -> None:
    with open(logfile, "ab") as f:
        for line in iter(proc.stdout.readline, b""):
            f.write(line)
            f.flush()
            if echo:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()


def _wait_all(procs: List[subprocess.Popen]) -> Tuple[List[int], Optional[int]]:
    """Wait for every process; if one fails, stop the others (a dead rank would hang the rest).
    Returns the exit codes and the rank that failed first (None: all succeeded)."""
    stopping = False
    first = None
    while True:
        codes = [p.poll() for p in procs]
        if first is None:
            first = next((r for r, c in enumerate(codes) if c not in (None, 0)), None)
        if all(c is not None for c in codes):
            return codes, first
        if not stopping and first is not None:
            stopping = True
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
        time.sleep(0.1)


def _stop(procs: List[subprocess.Popen], sig: int = signal.SIGINT, grace: float = 30.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    for p in procs:
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def make_executor(cluster):
    if cluster.name == "slurm":
        from launcher.slurm import SlurmExecutor  # the one module that knows Slurm

        return SlurmExecutor(cluster)
    return LocalExecutor(cluster)
