"""The local executor: each stage in subprocesses on this machine. Process plumbing shared with Slurm
lives in launcher/processes.py; every Slurm specific lives in launcher/slurm.py."""
from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

from launcher.manifest import Manifest, atomic_write_text, now
from launcher.processes import (Ended, exit_status, free_port, kit_checkout, log_tail, oom_kills,
                                processes_per_node, pump, rank_log, runner_argv, stop, wait_all)
from launcher.stages import EX_TEMPFAIL, REGISTRY

if TYPE_CHECKING:
    from launcher.plan import StageJob

log = logging.getLogger("launcher")


class LocalExecutor:
    """Runs each stage in subprocesses on this machine, one per GPU (or one on the CPU).

    Logs go to <stage>/log.txt (rank 0, also streamed to the terminal) and log_rank<N>.txt.
    """

    name = "local"

    def __init__(self, cluster):
        self.cluster = cluster
        self.inherit_fds: Sequence[int] = ()  # the run's launch lock: held until the stage processes end too

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

    def _command(self, job: "StageJob") -> List[str]:
        argv = runner_argv(job.run_dir, job.stage)
        if self.cluster.setup:
            script = "; ".join(list(self.cluster.setup) + ["exec " + shlex.join(argv)])
            return ["bash", "-c", script]
        return argv

    def render(self, job: "StageJob") -> str:
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

    def run(self, jobs: List["StageJob"], manifest: Manifest) -> int:
        """Run the jobs in order; stop at the first that does not succeed. Returns an exit code.

        While a stage runs, SIGTERM or SIGHUP to the launcher is handed to the stage's processes (a
        training stage checkpoints on it), which are given a grace period and then killed; the stage is
        recorded as stopped and the launcher exits 128+N, as if the signal had ended it."""
        main = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
        previous = {sig: signal.signal(sig, _raise_signalled) for sig in (signal.SIGTERM, signal.SIGHUP)} if main else {}
        try:
            for job in jobs:
                try:
                    code = self._run_one(job, manifest)
                except (KeyboardInterrupt, Signalled) as e:  # before its processes started: nothing to hand over
                    code = self._stopped(job, manifest, [], [], e)
                if code != 0:
                    for later in jobs[jobs.index(job) + 1:]:
                        log.info("stage %s not started: %s did not succeed", later.stage, job.stage)
                    return code
            return 0
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _run_one(self, job: "StageJob", manifest: Manifest) -> int:
        job.stage_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(job.config_path, job.run_yaml())
        atomic_write_text(job.stage_dir / "launch.sh", self.render(job))
        manifest.update_stage(job.stage, status="pending", job_ids=[], started=None, finished=None,
                              fingerprint=job.fingerprint, artifacts={}, error=None, executor="local")
        envs = self._rank_envs(job.stage, free_port())
        log.info("stage %s: running (%d process%s), log: %s", job.stage, len(envs), "" if len(envs) == 1 else "es",
                 job.stage_dir / "log.txt")
        procs: List[subprocess.Popen] = []
        pumps: List[threading.Thread] = []
        oom_before = oom_kills()
        try:
            for rank, env in enumerate(envs):
                p = subprocess.Popen(self._command(job), env={**os.environ, **env}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, cwd=os.getcwd(), pass_fds=tuple(self.inherit_fds))
                procs.append(p)
                t = threading.Thread(target=pump, args=(p, rank_log(job.stage_dir, rank), rank == 0), daemon=True)
                t.start()
                pumps.append(t)
            manifest.update_stage(job.stage, job_ids=[str(p.pid) for p in procs])
            ended = wait_all(procs)
        except (KeyboardInterrupt, Signalled) as e:
            return self._stopped(job, manifest, procs, pumps, e)
        for t in pumps:
            t.join(timeout=10)
        return self._outcome(job, manifest, ended, oom_before)

    def _stopped(self, job, manifest: Manifest, procs, pumps, why: BaseException) -> int:
        """The launcher was interrupted (Ctrl-C) or signalled: stop the stage's processes, record the stop."""
        sig = why.signum if isinstance(why, Signalled) else signal.SIGINT
        name = signal.Signals(sig).name
        log.warning("%s: stopping stage %s (its processes get %s, then %.0f s to exit)", name, job.stage,
                    name if sig != signal.SIGHUP else "SIGTERM", STOP_GRACE_S)
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)  # a second signal must not cut the hand-over short
        stop(procs, signal.SIGTERM if sig == signal.SIGHUP else sig, grace=STOP_GRACE_S)
        for t in pumps:
            t.join(timeout=5)
        entry = manifest.stage(job.stage)
        what = "interrupted (Ctrl-C)" if sig == signal.SIGINT else f"stopped: the launcher received {name}"
        if entry.get("status") != "succeeded":
            note = entry.get("requeue_note")
            manifest.update_stage(job.stage, status="cancelled", finished=now(),
                                  error=f"{what}; {note}" if note else what)
        return 128 + sig

    def _outcome(self, job, manifest: Manifest, ended: Ended, oom_before: Optional[int]) -> int:
        codes, first = ended.codes, ended.first
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
            reason = killed_reason(job.stage, code, ended.peak_rss_kib[first or 0], oom_before)
            if len(codes) > 1 and first is not None:
                reason = f"rank {first}: {reason}" + ("; the other ranks were stopped" if any(
                    c != 0 for r, c in enumerate(codes) if r != first) else "")
            manifest.update_stage(job.stage, status="failed", finished=now(), error=reason)
        entry = manifest.stage(job.stage)
        logfile = rank_log(job.stage_dir, first or 0)
        if first:  # only rank 0's output reaches the console: show the end of the failed rank's log
            log.error("the end of %s:\n%s", logfile, log_tail(logfile).rstrip())
        log.error("stage %s: %s (%s); its log: %s", job.stage, entry.get("status"), entry.get("error"), logfile)
        return exit_status(code) or 1


STOP_GRACE_S = 30.0  # what a stopped stage gets to checkpoint and exit before it is killed


class Signalled(BaseException):
    """SIGTERM or SIGHUP to the launcher while a stage runs (KeyboardInterrupt's counterpart)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_signalled(signum, frame):
    raise Signalled(signum)


def killed_reason(stage: str, code: int, peak_rss_kib: int, oom_before: Optional[int] = None) -> str:
    """Why a process that recorded nothing ended: its exit code, or the signal and what it likely means
    (SIGKILL: the kernel's out-of-memory killer, with the peak memory and the keys that lower it)."""
    if code >= 0:
        return f"exit code {code}"
    sig = -code
    name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
    reason = f"killed by {name} (signal {sig}, exit status {128 + sig})"
    if sig == signal.SIGKILL:
        after = oom_kills()
        peak = f"peak memory {peak_rss_kib / 1024 ** 2:.2f} GiB (ru_maxrss)"
        keys = ", ".join(REGISTRY[stage].memory_keys) or "smaller batches"
        if oom_before is not None and after is not None and after > oom_before:
            reason += f": the kernel's out-of-memory killer ended it, {peak}; lower it with {keys}"
        else:
            reason += (f": most likely the kernel's out-of-memory killer (or kill -9), {peak}; "
                       f"if memory ran out, lower it with {keys}")
    return reason


def make_executor(cluster):
    if cluster.name == "slurm":
        from launcher.slurm import SlurmExecutor  # the one module that knows Slurm

        return SlurmExecutor(cluster)
    return LocalExecutor(cluster)
