"""The Slurm executor against a real single-node Slurm (tests/slurm/start_slurm.sh: accounting, enforced
accounts, 2 fake GPUs). Skipped with a how-to when no cluster answers; a failure under CI=true.

Stages are the real ones (prep) or real ones wrapped by tests/slurm/hooks (slow, checkpointing, dying,
probing GPUs): the launcher, runner, manifest, sbatch, sacct and scontrol are never mocked.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from tests.kit import ROOT, cli
from tests.slurm.cluster import hook, job_field, manifest, require_slurm, sacct_state, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(240)]
SLURM = ["cluster=slurm", "cluster.partition=debug", "cluster.time=00:10:00"]


@pytest.fixture(scope="module", autouse=True)
def _cluster():
    require_slurm()


def runs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.runs", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def submitted_ids(stdout: str) -> dict:
    m = re.search(r"^submitted (.*?);", stdout, re.M)
    assert m, stdout
    return dict(pair.split("=") for pair in m.group(1).split(", "))


@pytest.fixture(scope="module")
def prepped(tmp_path_factory):
    """A run whose prep stage ran through Slurm (cluster.wait=true): the single-submission case."""
    run = tmp_path_factory.mktemp("prepped")
    r = cli("stage=prep", f"run.dir={run}", *SLURM, "cluster.wait=true", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return run, r


def test_single_submission_waits_streams_and_records(prepped):
    run, r = prepped
    entry = manifest(run)["stages"]["prep"]
    assert entry["status"] == "succeeded" and entry["executor"] == "slurm"
    (jid,) = entry["job_ids"]
    assert submitted_ids(r.stdout) == {"prep": jid}
    assert sacct_state(jid) == "COMPLETED"
    assert "stage prep: rank 0 of 1" in r.stdout, "the stage's log is streamed while waiting"
    assert (run / "prep" / "log.txt").resolve() == (run / "prep" / "slurm" / f"{jid}_0_log.out")
    script = (run / "prep" / "submit.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in script and "gpus" not in script and "#SBATCH --cpus-per-task=2" in script
    # the dry run shows exactly what was submitted
    dry = cli("stage=prep", f"run.dir={run}", *SLURM, "cluster.wait=true", "dry_run=true")
    assert dry.returncode == 0, dry.stderr
    assert (run / "dry_run" / "prep" / "submit.sbatch").read_text() == script


def test_submission_returns_at_once_and_status_follows(tmp_path):
    t0 = time.time()
    r = cli("stage=prep", f"run.dir={tmp_path}", *SLURM, *hook("slow", "prep"))
    assert r.returncode == 0, r.stderr
    jid = submitted_ids(r.stdout)["prep"]
    assert time.time() - t0 < 30
    assert manifest(tmp_path)["stages"]["prep"]["job_ids"] == [jid]
    wait_for(lambda: manifest(tmp_path)["stages"]["prep"]["status"] == "running", 30, "prep running")
    st = runs("status", str(tmp_path))
    assert re.search(rf"prep\s+running\s+job\s+{jid}\s+slurm RUNNING", st.stdout), st.stdout
    c = runs("cancel", str(tmp_path))
    assert c.returncode == 0 and f"prep (job {jid})" in c.stdout, c.stdout + c.stderr
    wait_for(lambda: sacct_state(jid).startswith("CANCELLED"), 30, "job cancelled")
    st = runs("status", str(tmp_path))
    assert re.search(rf"prep\s+cancelled\s+job\s+{jid}\s+slurm CANCELLED", st.stdout), st.stdout


def test_chain_is_afterok_and_a_failing_first_stage_cancels_the_rest(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("this is not HH-RLHF\n")
    r = cli("stage=all", f"run.dir={tmp_path}/run", *SLURM, "cluster.wait=true", "data.source=local",
            f"data.path={bad}", timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    ids = submitted_ids(r.stdout)
    assert list(ids) == ["prep", "rm", "ppo"]
    rm_script = (tmp_path / "run" / "rm" / "submit.sbatch").read_text()
    ppo_script = (tmp_path / "run" / "ppo" / "submit.sbatch").read_text()
    assert f"#SBATCH --dependency=afterok:{ids['prep']}\n" in rm_script
    assert f"#SBATCH --dependency=afterok:{ids['prep']}:{ids['rm']}\n" in ppo_script
    assert "#SBATCH --kill-on-invalid-dep=yes" in rm_script and "afterany" not in rm_script + ppo_script
    stages = manifest(tmp_path / "run")["stages"]
    # issue 18 item 6: data that cannot make a model is a PrepError naming the file (was "no training text")
    assert stages["prep"]["status"] == "failed" and "no comparison pair" in stages["prep"]["error"]
    for s in ("rm", "ppo"):
        assert stages[s]["status"] == "cancelled" and "did not succeed" in stages[s]["error"]
        assert sacct_state(ids[s]).startswith("CANCELLED")
        assert not stages[s].get("started"), "a stage after a failed one never starts"
    assert "no comparison pair (and no prompt) kept from" in r.stdout + r.stderr, "the failed stage's log tail is shown"


def test_cancel_a_queued_chain(tmp_path):
    r = cli("stage=all", f"run.dir={tmp_path}", *SLURM, *hook("slow", "prep"))
    assert r.returncode == 0, r.stderr
    ids = submitted_ids(r.stdout)
    assert job_field(ids["rm"], "Dependency").startswith(f"afterok:{ids['prep']}")
    assert job_field(ids["rm"], "JobState") == "PENDING"
    st = runs("status", str(tmp_path))
    assert all(re.search(rf"{s}\s+(pending|running)\s+job\s+{ids[s]}", st.stdout) for s in ids), st.stdout
    assert runs("cancel", str(tmp_path)).returncode == 0
    for s, jid in ids.items():
        wait_for(lambda: sacct_state(jid).startswith("CANCELLED"), 30, f"{s} cancelled")
        assert manifest(tmp_path)["stages"][s]["status"] == "cancelled"


def test_status_and_cancel_hints_are_shell_quoted(tmp_path):
    """Issue 18 item 8: every hint the launcher prints (after a submission, when a second launch finds the
    run's jobs live, on Ctrl-C while waiting) names run.dir shell-quoted. Unquoted, a run directory with a
    space and `$(...)` split into several arguments and pasting the hint into a shell ran the command in it."""
    run = tmp_path / "a b;$(touch PWNED) `touch PWNED`"
    argv = ["stage=prep", f"run.dir='{run}'", *SLURM, "cluster.cpus_per_task=1", *hook("slow", "prep")]
    # the shell a user pastes a hint into: `python` is this interpreter, the kit importable from anywhere
    shell_env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
                 "PYTHONPATH": str(ROOT)}

    def check(hint: str, verb: str) -> subprocess.CompletedProcess:
        """The hint pasted into a shell runs nothing else and hands the launcher run.dir as one argument."""
        r = subprocess.run(["bash", "-c", hint], cwd=tmp_path, env=shell_env, capture_output=True, text=True,
                           timeout=60)  # cwd: where `touch PWNED` would land
        assert not (tmp_path / "PWNED").exists() and not (ROOT / "PWNED").exists(), f"{hint!r} ran `touch PWNED`"
        assert shlex.split(hint) == ["python", "-m", "launcher.runs", verb, str(run)], hint
        assert r.returncode == 0, hint + "\n" + r.stdout + r.stderr
        return r

    try:
        # 1. the line after a submission: status and cancel
        r = cli(*argv)
        assert r.returncode == 0, r.stdout + r.stderr
        jid = submitted_ids(r.stdout)["prep"]
        m = re.search(r"^submitted prep=\d+; status: (.+?); cancel: (.+)$", r.stdout, re.M)
        assert m, r.stdout
        status, cancel_hint = m.groups()
        st = check(status, "status")
        assert f"run {run}" in st.stdout and re.search(rf"prep\s+\w+\s+job\s+{jid}\b", st.stdout), st.stdout
        assert shlex.split(cancel_hint) == ["python", "-m", "launcher.runs", "cancel", str(run)], cancel_hint
        # 2. a second launch while the job is live is refused, saying how to cancel it
        again = cli(*argv)
        assert again.returncode == 2, again.stdout + again.stderr
        (line,) = [l for l in again.stderr.splitlines() if "cancel them: " in l]
        c = check(line.split("cancel them: ", 1)[1], "cancel")
        assert f"prep (job {jid})" in c.stdout, c.stdout + c.stderr
        wait_for(lambda: sacct_state(jid).startswith("CANCELLED"), 30, "job cancelled by the pasted hint")
        check(cancel_hint, "cancel")  # the submission's own cancel hint: nothing left to cancel
        # 3. Ctrl-C while waiting: the jobs keep running, and the warning says how to cancel them
        out = tmp_path / "launch.out"
        with open(out, "w") as f:
            p = subprocess.Popen([sys.executable, str(ROOT / "launcher" / "main.py"), *argv, "cluster.wait=true"],
                                 cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: "[hook slow] attempt 0" in out.read_text(), 60, "the waiting launch streaming the log")
            p.send_signal(signal.SIGINT)
            assert p.wait(timeout=30) == 130, out.read_text()
        finally:
            if p.poll() is None:
                p.kill()
        text = out.read_text()
        jid2 = submitted_ids(text)["prep"]
        m = re.search(r"stopped waiting; the jobs keep running \((.+)\)$", text, re.M)
        assert m, text
        c = check(m.group(1), "cancel")
        assert f"prep (job {jid2})" in c.stdout, c.stdout + c.stderr
        wait_for(lambda: sacct_state(jid2).startswith("CANCELLED"), 30, "job cancelled by the pasted hint")
    finally:  # a failed check leaves no job behind to hold the node's CPUs for the tests after it
        runs("cancel", str(run))


def test_sweep_is_one_job_array_with_a_run_folder_per_point(tmp_path):
    sweep = tmp_path / "sweep"
    r = cli("-m", "stage=prep", "data.max_pairs=40,50,60", "cluster=slurm", "hydra/launcher=submitit_slurm",
            "hydra.launcher.partition=debug", "hydra.launcher.timeout_min=5", "hydra.launcher.cpus_per_task=1",
            f"hydra.sweep.dir={sweep}", timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    arrays = {p.name.split("_")[0] for p in (sweep / ".submitit").glob("[0-9]*_*")}
    assert len(arrays) == 1, f"one job array, got {arrays}"
    lines = [json.loads(l) for l in (sweep / "sweep_results.jsonl").read_text().splitlines()]
    assert sorted(l["num"] for l in lines) == [0, 1, 2]
    for point in lines:
        run = sweep / str(point["num"])
        assert point["run_dir"] == str(run) and point["exit_code"] == 0
        entry = manifest(run)["stages"]["prep"]
        assert entry["status"] == "succeeded" and entry["executor"] == "local", "no nested submission"
        assert point["stages"]["prep"]["artifacts"]["data_prefix"] == entry["artifacts"]["data_prefix"]
        assert f"data.max_pairs={40 + 10 * point['num']}" in point["overrides"]
    st = runs("status", str(sweep))
    assert st.stdout.count("prep  succeeded") == 3, st.stdout


def test_fake_gpus_one_task_per_gpu_with_torch_distributed(prepped):
    run, _ = prepped
    r = cli("stage=rm", f"run.dir={run}", *SLURM, "cluster.gpus_per_node=2", "cluster.wait=true",
            *hook("probe", "rm"), timeout=200)
    assert r.returncode == 0, r.stdout + r.stderr
    entry = manifest(run)["stages"]["rm"]
    (jid,) = entry["job_ids"]
    script = (run / "rm" / "submit.sbatch").read_text()
    assert "#SBATCH --gpus-per-node=2" in script and "#SBATCH --ntasks-per-node=2" in script
    probes = [json.loads((run / "rm" / f"probe_{rank}.json").read_text()) for rank in (0, 1)]
    for rank, p in enumerate(probes):
        assert (p["RANK"], p["LOCAL_RANK"], p["WORLD_SIZE"], p["SLURM_NTASKS"]) == (str(rank), str(rank), "2", "2")
        assert sorted(p["CUDA_VISIBLE_DEVICES"].split(",")) == ["0", "1"]
        assert p["sum"] == 2.0, "all_reduce over the two tasks"
    alloc = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "AllocTRES", "-j", jid], capture_output=True, text=True)
    assert "gres/gpu=2" in alloc.stdout
    assert "torch.distributed ready: gloo, rank 0 of 2" in (run / "rm" / "slurm" / f"{jid}_0_log.out").read_text()


def test_requeue_and_resume_after_scontrol_requeue_and_near_the_time_limit(tmp_path):
    # a training-like stage with its own handler, 1-minute limit, told 50 s before: USR1 -> checkpoint -> exit 75
    timed = tmp_path / "timed"
    r = cli("stage=prep", f"run.dir={timed}", *SLURM, "cluster.time=1", "cluster.signal_delay_s=50",
            *hook("checkpoint", "prep"))
    assert r.returncode == 0, r.stderr
    timed_id = submitted_ids(r.stdout)["prep"]
    # a stage with no handler (prep): `scontrol requeue` while it runs
    requeued = tmp_path / "requeued"
    r = cli("stage=prep", f"run.dir={requeued}", *SLURM, *hook("slow", "prep"))
    assert r.returncode == 0, r.stderr
    rq_id = submitted_ids(r.stdout)["prep"]
    wait_for(lambda: manifest(requeued)["stages"]["prep"]["status"] == "running", 30, "prep running")
    subprocess.run(["scontrol", "requeue", rq_id], check=True)

    def done(run):
        e = manifest(run)["stages"]["prep"]
        return e if e["status"] in ("succeeded", "failed", "cancelled") else None

    for run, jid in ((requeued, rq_id), (timed, timed_id)):
        entry = wait_for(lambda: done(run), 150, f"{run.name} finished", poll=1)
        log = (run / "prep" / "slurm" / f"{jid}_0_log.out").read_text()
        assert entry["status"] == "succeeded", (entry, log[-3000:])
        assert entry["restarts"] == 1 and entry["job_ids"] == [jid], "the same job, restarted once"
        assert "[hook" in log and "attempt 1" in log
    timed_entry = manifest(timed)["stages"]["prep"]
    timed_log = (timed / "prep" / "slurm" / f"{timed_id}_0_log.out").read_text()
    assert "SIGUSR1: saved a checkpoint" in timed_log and "resumed from step" in timed_log
    assert "exited 75" in timed_entry["requeue_note"] and "requeued" in timed_entry["requeue_note"]
    rq_entry = manifest(requeued)["stages"]["prep"]
    assert "SIGTERM" in rq_entry["requeue_note"] and "requeued by Slurm" in rq_entry["requeue_note"]


def test_a_requeue_during_a_long_validation_keeps_the_rm_stages_work(tmp_path):
    """Issue 18 item 12: Slurm requeue keeps its work. The real rm stage (tiny, CPU) is requeued with
    `scontrol requeue` (SIGTERM, then SIGKILL KillWait=5 s later) during its step-1 validation, which takes
    20 s on that attempt: the loop cuts the validation short, checkpoints step 1 and exits 75; the same job
    restarts, resumes at step 1 (that validation first) and ends after the same 2 steps, each trained once.
    Before the fix the validation ran on, the job was killed with no checkpoint and restarted from step 0."""
    steps = 2
    r = cli("stage=prep,rm", f"run.dir={tmp_path}", *SLURM, "cluster.cpus_per_task=2", "data.max_pairs=40",
            f"rm.trainer.rm.max_steps={steps}", "rm.trainer.rm.max_epochs=-1", "rm.trainer.rm.val_check_interval=1",
            "rm.trainer.rm.save_interval=0", "rm.model.global_batch_size=4", "rm.model.micro_batch_size=4",
            *hook("slowval", "rm"), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    jid = submitted_ids(r.stdout)["rm"]
    log, metrics = tmp_path / "rm" / "slurm" / f"{jid}_0_log.out", tmp_path / "rm" / "metrics.jsonl"

    def rows(split: str) -> list:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        return [row for row in map(json.loads, lines) if row["split"] == split]

    def done():
        e = manifest(tmp_path)["stages"].get("rm", {})
        return e if e.get("status") in ("succeeded", "failed", "cancelled") else None

    try:
        # step 1 is trained (its row is written before its validation), its slow validation under way
        wait_for(lambda: rows("train") and "validations take 2 s" in log.read_text(), 150, "rm's step 1", poll=0.2)
        requeued_at = time.time()
        subprocess.run(["scontrol", "requeue", jid], check=True, timeout=30)
        entry = wait_for(done, 150, "rm finished after the requeue", poll=1)
    except BaseException:  # leave no job behind to hold the node's CPUs for the tests after it
        runs("cancel", str(tmp_path))
        raise
    text = log.read_text()
    assert entry["status"] == "succeeded", (entry, text[-3000:])
    assert entry["restarts"] == 1 and entry["job_ids"] == [jid], "the same job, restarted once"
    attempt0, _, attempt1 = text.partition("[hook slowval] attempt 1")
    assert attempt1, text[-3000:]
    saved = re.search(r"preempted: checkpointed at step (\d+)", attempt0)
    resumed = re.search(r"resumed from \S+ at step (\d+)", attempt1)
    assert saved and resumed, "no checkpoint within KillWait, the restart began at step 0:\n" + text[-3000:]
    note = entry.get("requeue_note", "")
    assert "exited 75" in note and "requeued by Slurm" in note, entry
    assert int(resumed.group(1)) == int(saved.group(1)) >= 1, "resumed from the checkpoint the requeue made"
    assert "validation cut short by a signal" in attempt0 or "its validation runs after the resume" in attempt0
    train, val = rows("train"), rows("val")
    assert [row["step"] for row in train] == list(range(1, steps + 1)), "each step trained once, none lost"
    assert train[0]["time"] < requeued_at, "step 1 is the first attempt's, not trained again"
    assert [row["step"] for row in val] == list(range(1, steps + 1)), "the cut validation ran after the resume"
    index = json.loads((tmp_path / "rm" / "checkpoints" / "index.json").read_text())["checkpoints"]
    assert max(c["step"] for c in index) == steps
    wait_for(lambda: sacct_state(jid) == "COMPLETED", 30, "the job COMPLETED")  # it ends after the manifest says so


def test_a_job_that_dies_without_a_result_is_failed_with_its_log_tail(tmp_path):
    r = cli("stage=prep", f"run.dir={tmp_path}", *SLURM, "cluster.wait=true", *hook("die", "prep"), timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    entry = manifest(tmp_path)["stages"]["prep"]
    assert entry["status"] == "failed" and "without the stage recording a result" in entry["error"]
    assert "ended FAILED" in entry["error"]
    assert "last lines of" in r.stdout + r.stderr and "[hook die] attempt 0" in r.stdout + r.stderr


@pytest.mark.parametrize("overrides, slurm_says, we_say", [
    (["cluster.partition=nope"], "Invalid partition name", "cluster.partition='nope': no such partition"),
    (["cluster.account=others"], "Invalid account", "cluster.account='others': you may not submit"),
    (["cluster.gpus_per_node=4"], "Requested node configuration is not available", "asks for more than a node has"),
])
def test_bad_input_is_refused_by_slurm_and_explained_and_nothing_is_recorded(tmp_path, overrides, slurm_says, we_say):
    r = cli("stage=prep,rm", f"run.dir={tmp_path}", *SLURM, *overrides)  # gpus: prep is queued, then rm refused
    assert r.returncode == 2, r.stdout + r.stderr
    assert slurm_says in r.stderr and we_say in r.stderr and "Traceback" not in r.stderr
    assert manifest(tmp_path)["stages"] == {}, "no manifest entry names a job that does not exist"
    assert not list(tmp_path.glob("*/slurm/.submission_file_*")) and not (tmp_path / "prep" / "config.yaml").exists()
    queued = subprocess.run(["squeue", "-h", "-O", "JobID:12,StdOut:400"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in queued, "a job queued before the refused one was cancelled"


def test_bad_time_format_is_refused_before_submission(tmp_path):
    r = cli("stage=prep", f"run.dir={tmp_path}", *SLURM, "cluster.time=1:2:3:4")
    assert r.returncode == 2 and "cluster.time='1:2:3:4' is not a Slurm time" in r.stderr, r.stderr
    assert not (tmp_path / "manifest.json").exists() or manifest(tmp_path)["stages"] == {}
