"""The one module that knows Slurm: the cluster keys -> sbatch/srun options table, submission through
submitit (one job per stage, chained with afterok), requeue from inside a job, and job states from
sacct. Everything else in the kit stays scheduler-free.

A stage job is `srun python -m launcher.stage_runner --run-dir RUN --stage NAME --requeue`: the runner
records its own status in the manifest, so no result pickle is needed; submitit writes the sbatch
file, submits it and reads job states back (sacct).
"""
from __future__ import annotations

import logging
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

from launcher.errors import ConfigError, suggest
from launcher.manifest import Manifest, atomic_write_text, now
from launcher.processes import kit_checkout, log_tail, processes_per_node, runner_argv
from launcher.stages import REGISTRY

if TYPE_CHECKING:
    from launcher.plan import StageJob

log = logging.getLogger("launcher")
try:
    from submitit.core.utils import FailedJobError, FailedSubmissionError
except ImportError:  # pragma: no cover - submitit is a core dependency
    FailedJobError = FailedSubmissionError = RuntimeError

# cluster.<key> -> what it becomes. The executor reads exactly these keys; `ClusterConfig` types them.
PARAMETERS = {
    "partition": "--partition",
    "account": "--account",
    "qos": "--qos",
    "nodes": "--nodes (GPU stages; prep runs on one node)",
    "gpus_per_node": "--gpus-per-node=N or --gres=gpu:N (cluster.gpu_option), and N tasks per node",
    "processes_per_node": "--ntasks-per-node (default: gpus_per_node, one task per GPU)",
    "cpus_per_task": "--cpus-per-task (prep default: data.workers)",
    "mem": "--mem",
    "time": "--time (the runner's time limit; see signal_delay_s)",
    "exclusive": "--exclusive",
    "constraint": "--constraint",
    "sbatch_args": "any other sbatch option: {option: value}, value true for a flag",
    "srun_args": "extra srun arguments",
    "env": "exported in the batch script before srun",
    "setup": "shell lines run in the batch script before srun",
    "container_image": "srun --container-image (pyxis/enroot)",
    "container_mounts": "srun --container-mounts (the run directory is always mounted)",
    "python": "the Python that runs the stage in the job (default: this interpreter)",
    "requeue": "--requeue; a signalled stage is requeued and resumes from its checkpoint",
    "signal_delay_s": "--signal=USR1@N: the stage is told N seconds before the time limit",
    "max_requeues": "stop requeueing a stage after this many restarts",
    "wait": "wait for the jobs, stream the running stage's log, return the chain's exit code",
}
# Options the kit sets itself from the keys above (set those keys instead).
OWNED = {"partition": "partition", "account": "account", "qos": "qos", "nodes": "nodes", "time": "time",
         "ntasks-per-node": "processes_per_node", "gpus-per-node": "gpus_per_node", "gres": "gpus_per_node",
         "cpus-per-task": "cpus_per_task", "mem": "mem", "exclusive": "exclusive", "constraint": "constraint",
         "job-name": None, "output": None, "error": None, "dependency": None, "signal": "signal_delay_s",
         "requeue": "requeue", "no-requeue": "requeue", "hold": None, "array": None, "open-mode": None,
         "kill-on-invalid-dep": None, "wrap": None, "parsable": None}
# sbatch's long options (Slurm 22.05-23.x), for `cluster.sbatch_args`.
SBATCH_OPTIONS = set("""
account acctg-freq array batch bb bbf begin chdir cluster-constraint clusters comment constraint container
contiguous core-spec cores-per-socket cpu-freq cpus-per-gpu cpus-per-task deadline delay-boot dependency
distribution error exclude exclusive export export-file extra-node-info get-user-env gid gpu-bind gpu-freq
gpus gpus-per-node gpus-per-socket gpus-per-task gres gres-flags hint hold ignore-pbs input job-name
kill-on-invalid-dep licenses mail-type mail-user mcs-label mem mem-bind mem-per-cpu mem-per-gpu mincpus
network nice no-kill no-requeue nodefile nodelist nodes ntasks ntasks-per-core ntasks-per-gpu
ntasks-per-node ntasks-per-socket open-mode output overcommit oversubscribe parsable partition power
prefer priority profile propagate qos quiet reboot requeue reservation signal sockets-per-node spread-job
switches test-only thread-spec threads-per-core time time-min tmp tres-per-task uid use-min-nodes verbose
wait wait-all-nodes wckey wrap
""".split())
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED", "SPECIAL_EXIT")


def slurm_minutes(value: str) -> int:
    """A Slurm time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes, rounded up."""
    text = str(value).strip()
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
        parts = [int(p) for p in text.split(":")]
        h, m, s = (parts + [0, 0])[:3]
    else:
        parts = [int(p) for p in text.split(":")]
        h, m, s = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    return max(1, math.ceil(days * 1440 + h * 60 + m + s / 60))


def is_gpu_stage(stage: str) -> bool:
    """prep is CPU-only (one task); training stages get the nodes and one task per GPU."""
    return REGISTRY[stage].distributed


def inside_submitit_job() -> bool:
    """True inside a job that submitit started (a hydra-submitit-launcher sweep point)."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "SLURM_JOB_ID" in os.environ


def cluster_problems(c) -> List[str]:
    """What the Slurm keys get wrong, all of it (validation reports it with the rest before launch)."""
    problems: List[str] = []
    # each of these lands on a line of the batch script (#SBATCH --partition=..., srun ...): a newline in
    # one would start a line of its own, which the script would run
    lines = {f"cluster.{k}": c[k] for k in ("partition", "account", "qos", "time", "mem", "constraint",
                                           "container_image", "python") if c[k] is not None}
    lines.update({f"cluster.container_mounts[{i}]": v for i, v in enumerate(c.container_mounts)})
    lines.update({f"cluster.srun_args[{i}]": v for i, v in enumerate(c.srun_args)})
    for k, v in c.sbatch_args.items():
        lines[f"cluster.sbatch_args.{k} (its name)"] = k
        lines[f"cluster.sbatch_args.{k}"] = v
    problems += [one_line_problem(key, value) for key, value in lines.items() if one_line_problem(key, value)]
    for key in c.sbatch_args:
        opt = str(key).lstrip("-")
        if opt in OWNED:
            owner = OWNED[opt]
            problems.append(f"cluster.sbatch_args.{key}: set by the kit" +
                            (f"; use cluster.{owner}" if owner else " (it manages this option itself)"))
        elif opt not in SBATCH_OPTIONS:
            problems.append(f"cluster.sbatch_args.{key}: not an sbatch option.{suggest(opt, SBATCH_OPTIONS)} "
                            f"Valid options: {', '.join(sorted(SBATCH_OPTIONS - set(OWNED)))}")
    for arg in c.srun_args:
        if not str(arg).startswith("-"):
            problems.append(f"cluster.srun_args: {arg!r} is not an option (write --name=value)")
    if c.signal_delay_s < 0 or c.max_requeues < 0:
        problems.append("cluster.signal_delay_s and cluster.max_requeues must be >= 0")
    try:
        slurm_minutes(c.time)
    except (ValueError, KeyError):
        problems.append(f"cluster.time={c.time!r} is not a Slurm time (MM, HH:MM:SS, D-HH[:MM[:SS]])")
    return problems


def one_line_problem(key: str, value) -> Optional[str]:
    """A value that reaches a line of a rendered script must stay on it."""
    if isinstance(value, str) and ("\n" in value or "\r" in value):
        return f"{key}={value!r}: holds a line break, which would put a line of its own in the rendered script"
    return None


def run_dir_problems(run_dir: str) -> List[str]:
    """sbatch expands `%j`, `%x`, ... in --output: a run directory holding `%` would send the job's log
    somewhere else (the job then fails with no log)."""
    if "%" in str(run_dir):
        return [f"run.dir={run_dir}: holds '%', which sbatch reads as a filename pattern (%j, %x ...) in the "
                "job's log path; choose a run directory without '%' for cluster=slurm"]
    return []


class SlurmExecutor:
    """Submits each stage as one Slurm job through submitit; stages of a run are chained with afterok."""

    name = "slurm"

    def __init__(self, cluster):
        self.cluster = cluster
        self._check()

    # ------------------------------------------------------------------ what a job asks for
    def _check(self) -> None:
        problems = cluster_problems(self.cluster)
        if problems:
            raise ConfigError(problems)

    @staticmethod
    def check_submittable() -> None:
        """Before anything is written: a submission needs Slurm's commands here (a dry run does not)."""
        if shutil.which("sbatch") is None:
            raise ConfigError(["cluster=slurm: Slurm is not installed here (no sbatch on PATH), so nothing "
                               "can be submitted", "dry_run=true renders each job's batch script without Slurm; "
                               "cluster=local runs the stages on this machine"])

    def parameters(self, job: "StageJob") -> Dict:
        """submitit's parameters for one stage (its names; additional_parameters are raw sbatch options)."""
        c = self.cluster
        gpu = is_gpu_stage(job.stage)
        gpus = c.gpus_per_node if gpu else 0
        p = dict(job_name=f"rlhf-{job.cfg.run.name}-{job.stage}", nodes=c.nodes if gpu else 1,
                 ntasks_per_node=processes_per_node(c) if gpu else 1, time=str(c.time),
                 partition=c.partition, account=c.account, qos=c.qos, mem=c.mem, constraint=c.constraint,
                 cpus_per_task=c.cpus_per_task or (None if gpu else job.cfg.data.workers),
                 exclusive=True if c.exclusive else None, stderr_to_stdout=True, wckey=None,
                 setup=self._kit_path() + [f"export {k}={shlex.quote(str(v))}" for k, v in c.env.items()]
                 + list(c.setup),
                 srun_args=self._srun_args(job))
        if gpus:
            p.update(gpus_per_node=gpus) if c.gpu_option == "gpus_per_node" else p.update(gres=f"gpu:{gpus}")
        extra = {"signal": f"USR1@{c.signal_delay_s}"}
        if c.requeue:
            extra["requeue"] = True
        extra.update({str(k).lstrip("-"): v for k, v in c.sbatch_args.items()})
        p["additional_parameters"] = extra
        return {k: v for k, v in p.items() if v is not None or k == "wckey"}  # wckey: drop submitit's default

    @staticmethod
    def _kit_path() -> List[str]:
        """The job runs the checkout that submitted it (see executors.kit_checkout)."""
        checkout = kit_checkout()
        return [f"export PYTHONPATH={shlex.quote(str(checkout))}${{PYTHONPATH:+:$PYTHONPATH}}"] if checkout else []

    def _srun_args(self, job: "StageJob") -> List[str]:
        c = self.cluster
        args = [str(a) for a in c.srun_args]
        if c.container_image:
            mounts = list(c.container_mounts)
            run = str(job.run_dir)
            if not any(m.split(":")[0] == run or run.startswith(m.split(":")[0].rstrip("/") + "/") for m in mounts):
                mounts.append(f"{run}:{run}")  # the runner reads and writes the run directory
            args += [f"--container-image={c.container_image}", f"--container-mounts={','.join(mounts)}",
                     f"--container-workdir={os.getcwd()}"]
        return args

    def command(self, job: "StageJob") -> str:
        argv = runner_argv(job.run_dir, job.stage) + (["--requeue"] if self.cluster.requeue else [])
        if self.cluster.python:
            return " ".join([self.cluster.python] + [shlex.quote(a) for a in argv[1:]])
        return shlex.join(argv)

    def _executor(self, job: "StageJob", extra: Optional[Dict] = None, render_only: bool = False):
        import submitit

        class Executor(submitit.SlurmExecutor):  # the same text for the dry run and sbatch, with a note on top
            @classmethod
            def affinity(cls) -> int:  # submitit refuses to start without srun: rendering a script needs none
                return 2 if render_only else super().affinity()

            def _make_submission_file_text(self, command: str, uid: str) -> str:
                text = super()._make_submission_file_text(command, uid)
                return text.replace("#!/bin/bash\n", f"#!/bin/bash\n{note}\n", 1)

        deps = (extra or {}).get("dependency")
        note = ("# submitted held; released once every job of the run is queued and recorded" if not deps else
                f"# starts when {', '.join(job.after) or 'the stage before'} succeeded ({deps}); cancelled otherwise")
        ex = Executor(folder=job.stage_dir / "slurm", max_num_timeout=self.cluster.max_requeues)
        params = self.parameters(job)
        params["additional_parameters"] = {**params["additional_parameters"], **(extra or {})}
        try:
            ex.update_parameters(**params)
        except ValueError as e:  # submitit's own table of valid parameters
            raise ConfigError(f"cluster: {e}") from None
        return ex

    def render(self, job: "StageJob") -> str:
        """The exact batch script submitted for this stage (`%j` becomes the job id)."""
        deps = [f"{s.upper()}_JOB_ID" for s in job.after]
        extra = {"dependency": "afterok:" + ":".join(deps), "kill-on-invalid-dep": "yes"} if deps else {"hold": True}
        return self._executor(job, extra, render_only=True)._make_submission_file_text(self.command(job), "dry-run")

    # ------------------------------------------------------------------ submission
    def run(self, jobs: List["StageJob"], manifest: Manifest) -> int:
        """Submit the chain (roots held), record it, release it; wait if cluster.wait."""
        submitted: List[Tuple["StageJob", object]] = []
        ids: Dict[str, str] = {}
        for i, job in enumerate(jobs):
            deps = sorted({ids[s] for s in job.after if s in ids} | ({ids[jobs[i - 1].stage]} if i else set()),
                          key=int)
            extra = {"dependency": "afterok:" + ":".join(deps), "kill-on-invalid-dep": "yes"} if deps else {"hold": True}
            ex = self._executor(job, extra)
            (job.stage_dir / "slurm").mkdir(parents=True, exist_ok=True)
            try:
                sjob = ex._submit_command(self.command(job))
            except BaseException as e:  # sbatch refused (or we were interrupted): undo the chain
                cancel(list(ids.values()))
                for j, sj in submitted:  # leave no trace of this attempt: nothing ran, nothing is recorded
                    Path(sj.paths.submission_file).unlink(missing_ok=True)
                for j in [j for j, _ in submitted] + [job]:
                    for f in (j.stage_dir / "slurm").glob(".submission_file_*.sh"):
                        f.unlink()
                if isinstance(e, (FailedJobError, FailedSubmissionError)):
                    raise ConfigError(_refusal(job, e, self.cluster)) from None
                raise
            ids[job.stage] = sjob.job_id
            submitted.append((job, sjob))
        for job, sjob in submitted:
            job.stage_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(job.config_path, job.run_yaml())
            script = Path(sjob.paths.submission_file).read_text()
            atomic_write_text(job.stage_dir / "submit.sbatch", script)
            logfile = self.log_path(job, sjob.job_id)
            link = job.stage_dir / "log.txt"  # same place as a local run's log
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(logfile.relative_to(job.stage_dir))
            manifest.update_stage(job.stage, status="pending", job_ids=[sjob.job_id], started=None, finished=None,
                                  fingerprint=job.fingerprint, artifacts={}, error=None, executor="slurm",
                                  log=str(logfile), submitted=now())
        _scontrol("release", [submitted[0][1].job_id])  # every later job depends on the one before it
        for job, sjob in submitted:
            log.info("stage %s: submitted Slurm job %s, log: %s", job.stage, sjob.job_id, self.log_path(job, sjob.job_id))
        run_dir = jobs[0].run_dir
        here = shlex.quote(str(run_dir))
        print(f"submitted {', '.join(f'{j.stage}={s.job_id}' for j, s in submitted)}; "
              f"status: python -m launcher.runs status {here}; cancel: python -m launcher.runs cancel {here}",
              flush=True)
        if not self.cluster.wait:
            return 0
        return wait(manifest, [(job.stage, sjob.job_id) for job, sjob in submitted])

    @staticmethod
    def log_path(job: "StageJob", job_id: str) -> Path:
        return job.stage_dir / "slurm" / f"{job_id}_0_log.out"


def _refusal(job: "StageJob", error: Exception, cluster) -> List[str]:
    slurm = [l.strip() for l in str(error).splitlines() if "error" in l.lower() or "failed" in l.lower()]
    slurm = slurm or [str(error).strip()]
    ours = {  # Slurm's message -> which key to change (first match wins: "account/partition" is an account)
        "account": f"cluster.account={cluster.account!r}: you may not submit with this account "
                   "(sacctmgr show assoc user=$USER lists yours)",
        "partition": f"cluster.partition={cluster.partition!r}: no such partition here (sinfo lists them)",
        "node configuration": f"stage {job.stage} asks for more than a node has: cluster.gpus_per_node="
                              f"{cluster.gpus_per_node if is_gpu_stage(job.stage) else 0}, cluster.nodes={cluster.nodes}, "
                              f"cpus_per_task, mem (sinfo -o '%P %c %m %G' shows what nodes have)",
        "time": f"cluster.time={cluster.time!r} is refused by the partition",
    }
    text = " ".join(slurm).lower()
    hint = next((v for k, v in ours.items() if k in text), "see Slurm's message above")
    return [f"sbatch refused stage {job.stage}: " + " / ".join(slurm), hint,
            "nothing was submitted (jobs queued before it were cancelled) and the manifest is unchanged"]


# ---------------------------------------------------------------------- job states and control
def _scontrol(verb: str, ids: Sequence[str]) -> None:
    if ids:
        subprocess.run(["scontrol", verb, ",".join(ids)], check=True, capture_output=True, text=True, timeout=60)


def cancel(ids: Sequence[str]) -> None:
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60)


def job_info(ids: Sequence[str]) -> Dict[str, Dict[str, str]]:
    """{job id: {State, Reason, ExitCode, Elapsed, NodeList}}: squeue for live jobs (sacct lags behind the
    controller), sacct for ended ones, `scontrol show job` for what neither knows (no accounting)."""
    ids = [str(i) for i in ids if i]
    out: Dict[str, Dict[str, str]] = {}
    if not ids:
        return out
    names = ("State", "Reason", "ExitCode", "Elapsed", "NodeList")
    completing: Dict[str, Dict[str, str]] = {}
    queries = [(["squeue", "-h", "-j", ",".join(ids), "-o", "%i|%T|%r|-|%M|%N"], False),
               (["sacct", "-X", "-n", "-P", "-o", "JobID,State,Reason,ExitCode,Elapsed,NodeList", "-j"], True)]
    for argv, needs_ids in queries:
        todo = [i for i in ids if i not in out]
        if not todo:
            break
        try:
            r = subprocess.run(argv + ([",".join(todo)] if needs_ids else []), capture_output=True, text=True,
                               timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        for line in r.stdout.splitlines():
            vals = line.split("|")
            if len(vals) == 6 and vals[0] in todo:
                out[vals[0]] = dict(zip(names, vals[1:]))
        if not needs_ids:  # squeue: a COMPLETING job has ended; sacct knows how (CANCELLED, FAILED, ...)
            completing = {j: out.pop(j) for j in list(out) if out[j]["State"] == "COMPLETING"}
    for jid, row in completing.items():  # sacct had no terminal state for it yet
        if not is_terminal(out.get(jid, {}).get("State", "")):
            out[jid] = row
    for jid in set(ids) - set(out):
        try:
            r = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        kv = dict(w.split("=", 1) for w in r.stdout.split() if "=" in w)
        if "JobState" in kv:
            out[jid] = {"State": kv["JobState"], "Reason": kv.get("Reason", ""), "ExitCode": kv.get("ExitCode", ""),
                        "Elapsed": kv.get("RunTime", ""), "NodeList": kv.get("NodeList", "")}
    return out


def is_terminal(state: str) -> bool:
    return state.split()[0] in TERMINAL if state else False


def reconcile(manifest: Manifest, stage: str, info: Optional[Dict[str, str]]) -> Dict:
    """A job that ended without its runner recording a result is failed (or cancelled), with the reason."""
    entry = manifest.stage(stage)
    if not info or entry.get("status") not in ("pending", "running") or not is_terminal(info["State"]):
        return entry
    state, jid = info["State"].split()[0], (entry.get("job_ids") or ["?"])[-1]
    if state == "CANCELLED":
        never = "Dependency" in info.get("Reason", "") or entry.get("status") == "pending"
        why = ("not started: an earlier stage of the chain did not succeed" if never
               else f"Slurm job {jid} was cancelled") + f" (Slurm: {info['State']}, {info.get('Reason')})"
        return manifest.update_stage(stage, status="cancelled", finished=now(), error=why)
    why = f"Slurm job {jid} ended {state} (exit {info.get('ExitCode')}) without the stage recording a result"
    return manifest.update_stage(stage, status="failed", finished=now(), error=why)


def wait(manifest: Manifest, chain: List[Tuple[str, str]], poll_s: float = 1.0) -> int:
    """Stream the running stage's log until every job has ended; report each stage; exit code of the chain."""
    offsets: Dict[str, int] = {}
    reported: set = set()
    code = 0
    try:
        while True:
            infos = job_info([jid for _, jid in chain])
            for stage, jid in chain:
                entry = manifest.stage(stage)
                _stream(Path(entry.get("log", "")), offsets)
                info = infos.get(jid)
                if stage in reported or not info or not is_terminal(info["State"]):
                    continue
                entry = reconcile(manifest, stage, info)
                reported.add(stage)
                if entry.get("status") == "succeeded":
                    log.info("stage %s: succeeded (job %s); artifacts: %s", stage, jid, ", ".join(entry.get("artifacts", {})))
                    continue
                code = code or 1
                log.error("stage %s: %s (job %s, Slurm %s): %s", stage, entry.get("status"), jid, info["State"],
                          entry.get("error"))
                if entry.get("started"):
                    log.error("last lines of %s:\n%s", entry.get("log"), log_tail(Path(entry.get("log", "")), 30))
            if len(reported) == len(chain):
                return code
            time.sleep(poll_s)
    except KeyboardInterrupt:
        log.warning("stopped waiting; the jobs keep running (python -m launcher.runs cancel %s)",
                    shlex.quote(str(manifest.run_dir)))
        return 130


def _stream(path: Path, offsets: Dict[str, int]) -> None:
    try:
        with open(path, "rb") as f:
            f.seek(offsets.get(str(path), 0))
            data = f.read()
    except (FileNotFoundError, IsADirectoryError):
        return
    if data:
        offsets[str(path)] = offsets.get(str(path), 0) + len(data)
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


# ---------------------------------------------------------------------- inside the job
# What the stage runner does differently inside a Slurm job; outside one, each of these is a no-op.
REQUEUE_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # the requeue sends these again: ignored once stopping


def in_job() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID"))


def job_id() -> str:
    return os.environ["SLURM_JOB_ID"]


def job_fields() -> Dict[str, int]:
    """What the manifest records about this attempt of the job (its restart count)."""
    return {"restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)} if in_job() else {}


def cpus_per_task() -> Optional[int]:
    """--cpus-per-task as the job got it (each rank's share of the node's cores), None outside a job."""
    value = os.environ.get("SLURM_CPUS_PER_TASK")
    return max(1, int(value)) if value else None


def distributed_env() -> None:
    """Under Slurm, derive torch.distributed's variables from Slurm's (one task per GPU)."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    import submitit

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def on_time_limit(handler: Callable) -> None:
    """sbatch --signal=USR1@N (cluster.signal_delay_s): the time limit is N seconds away."""
    signal.signal(signal.SIGUSR1, handler)


def requeue_current_job(max_requeues: int) -> str:
    """Called by the runner (rank 0) after a signal or a stage's exit 75: put this job back in the queue.

    Returns what happened: "requeued", "requeued by Slurm" (preemption or `scontrol requeue`, which
    bump the restart count before the job is signalled), "cancelled" (scancel), or "limit".
    """
    jid = os.environ["SLURM_JOB_ID"]
    mine = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    r = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True, timeout=60)
    kv = dict(w.split("=", 1) for w in r.stdout.split() if "=" in w)
    state, restarts = kv.get("JobState", ""), int(kv.get("Restarts", mine) or mine)
    if restarts > mine or state in ("PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD"):
        return "requeued by Slurm"
    if state == "CANCELLED" or (state == "COMPLETING" and "TimeLimit" not in kv.get("Reason", "")):
        return "cancelled"
    if mine >= max_requeues:
        return "limit"
    subprocess.run(["scontrol", "requeue", jid], check=True, capture_output=True, text=True, timeout=60)
    return "requeued"
