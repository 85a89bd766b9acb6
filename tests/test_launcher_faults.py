"""Faults and hostile inputs the launcher is tested against (issue 18; README: "Faults the kit is tested
against"). Real launcher CLI, real subprocesses, real files; each test fails without its fix."""
from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kit import ROOT, cli


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def launch(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "launcher" / "main.py"), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def wait_for(predicate, timeout: float = 120, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def stage_status(run_dir: Path, stage: str):
    try:
        return manifest(run_dir)["stages"].get(stage, {}).get("status")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_an_unchanged_second_run_skips_every_stage(tmp_path):
    """The fingerprint recorded while prep's outputs were pending equals the one computed once prep is
    recorded: the second run skips all three stages (it re-ran rm and ppo), and `updated` moves."""
    run = tmp_path / "run"
    r = cli("debug=fdr", f"run.dir={run}", timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    first = manifest(run)
    time.sleep(1.1)  # `updated` has a resolution of one second
    r = cli("debug=fdr", f"run.dir={run}", timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for stage in ("prep", "rm", "ppo"):
        assert f"stage {stage}: up to date" in r.stdout, r.stdout[-3000:]
    second = manifest(run)
    assert {s: e["fingerprint"] for s, e in second["stages"].items()} == \
        {s: e["fingerprint"] for s, e in first["stages"].items()}
    assert second["updated"] > first["updated"]


HOOKS = ROOT / "tests" / "slurm" / "hooks"  # KIT_TEST_HOOK: test-only stage behaviours (sitecustomize.py there)


def hooked(mode: str, stage: str):
    return [f"+cluster.env.PYTHONPATH={HOOKS}{os.pathsep}{ROOT}", f"+cluster.env.KIT_TEST_HOOK={mode}:{stage}"]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_second_launch_is_refused_and_sigterm_stops_the_stage_it_hands_over_to(tmp_path):
    """Two launches on one run directory both trained (every metrics row twice). Now the second is
    refused at once naming the first (pid, host, since); SIGTERM to the first is handed to its stage,
    which is recorded as stopped (not left "running", its process orphaned), and the launcher exits 143."""
    run = tmp_path / "run"
    first = launch("stage=prep", f"run.dir={run}", *hooked("slow", "prep"))
    try:
        wait_for(lambda: stage_status(run, "prep") == "running", what="prep running")
        started = time.time()
        r = cli("stage=prep", f"run.dir={run}", timeout=60)
        assert r.returncode == 2, r.stdout + r.stderr
        assert time.time() - started < 30, "refused at once, not after waiting"
        assert f"another launch is running in this run directory (pid {first.pid} on host {socket.gethostname()}, " \
               "running since 20" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        stage_pid = int(manifest(run)["stages"]["prep"]["job_ids"][0])
        hint = subprocess.run([sys.executable, "-m", "launcher.runs", "cancel", str(run)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60).stdout
        assert f"stage prep runs locally: stop it with kill {first.pid} " in hint, hint
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=90)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 128 + signal.SIGTERM, out.decode()[-3000:]
    entry = manifest(run)["stages"]["prep"]
    assert entry["status"] == "cancelled" and "the launcher received SIGTERM" in entry["error"], entry
    assert entry["finished"]
    wait_for(lambda: _gone(stage_pid), timeout=10, what="the stage process to end")


def test_a_stale_lock_of_a_dead_launch_is_taken_over_saying_so(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    (run / ".launch.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                  "since": "2026-01-01T00:00:00+0000", "command": "python x"}))
    r = cli("stage=prep", f"run.dir={run}", "data.max_pairs=32", timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"taking over a stale lock of launch pid {dead.pid} (no longer running, started 2026-01-01" in r.stdout
    assert manifest(run)["stages"]["prep"]["status"] == "succeeded"


def test_the_stages_of_a_killed_launcher_still_hold_the_run(tmp_path):
    """SIGKILL cannot be handed over: the orphaned stage still holds the run directory's lock, so a
    second launch is refused (naming the dead launcher) instead of training beside it."""
    run = tmp_path / "run"
    first = launch("stage=prep", f"run.dir={run}", *hooked("slow", "prep"))
    stage_pid = None
    try:
        wait_for(lambda: stage_status(run, "prep") == "running", what="prep running")
        stage_pid = int(manifest(run)["stages"]["prep"]["job_ids"][0])
        first.kill()
        first.wait()
        r = cli("stage=prep", f"run.dir={run}", timeout=60)
        assert r.returncode == 2, r.stdout + r.stderr
        assert f"pid {first.pid}" in r.stderr and "that launcher has exited; stage processes it started still run" \
            in r.stderr, r.stderr
    finally:
        if first.poll() is None:
            first.kill()
        if stage_pid and not _gone(stage_pid):
            os.kill(stage_pid, signal.SIGKILL)  # the orphan this test made


def test_a_stage_killed_by_sigkill_exits_137_reported_as_a_likely_oom_kill_with_its_peak_memory(tmp_path):
    """A stage the kernel's OOM killer ends (SIGKILL: the hook kills itself so) gave the launcher
    exit status 247 and 'killed by signal 9'. Now: 128+9, the likely cause, the stage's peak memory
    and the keys that lower it; `runs status` says "local" for a local stage, not a blank Slurm state."""
    run = tmp_path / "run"
    r = cli("stage=prep", f"run.dir={run}", *hooked("die", "prep"), timeout=300)
    assert r.returncode == 128 + signal.SIGKILL, r.stdout[-3000:] + r.stderr[-3000:]
    entry = manifest(run)["stages"]["prep"]
    assert entry["status"] == "failed", entry
    err = entry["error"]
    assert err.startswith("killed by SIGKILL (signal 9, exit status 137): most likely the kernel's out-of-memory "
                          "killer (or kill -9), peak memory ") or "the kernel's out-of-memory killer ended it" in err, err
    assert "GiB (ru_maxrss)" in err and "data.workers" in err and " 0.00 GiB" not in err, err
    st = subprocess.run([sys.executable, "-m", "launcher.runs", "status", str(run)], cwd=ROOT, capture_output=True,
                        text=True, timeout=60)
    line = next(l for l in st.stdout.splitlines() if l.strip().startswith("prep"))
    assert " local " in line and "slurm" not in line, st.stdout


def refused(tmp_path, *args, expect: str) -> str:
    """Exit 2, the key named, no traceback, nothing written."""
    run = tmp_path / "run"
    r = cli(f"run.dir={run}", *args, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert expect in r.stderr, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not run.exists(), "a refused launch writes nothing"
    return r.stderr


@pytest.mark.parametrize("args, expect", [
    (["run.name='x\ntouch pwned'", "stage=prep"], "run.name='x\\ntouch pwned': holds a line break"),
    (["cluster=slurm", "dry_run=true", "cluster.partition='gpu\n#SBATCH --wrap=id'"],
     "cluster.partition='gpu\\n#SBATCH --wrap=id': holds a line break"),
    (["cluster=slurm", "dry_run=true", "cluster.account='a\nb'", "cluster.mem='1G\nc'"], "cluster.mem='1G\\nc'"),
    (["cluster=slurm", "dry_run=true", "+cluster.sbatch_args.comment='a\nid'"],
     "cluster.sbatch_args.comment='a\\nid': holds a line break"),
    (["stage=prep", "+cluster.env.BAD-NAME=1"], "cluster.env.BAD-NAME: 'BAD-NAME' is not an environment variable name"),
    (["cluster=slurm", "dry_run=true", "LOCAL"], "cluster.env.X; id: 'X; id' is not an environment variable name"),
])
def test_strings_that_would_break_out_of_a_rendered_script_are_refused(tmp_path, args, expect):
    """run.name with a newline put an executable line in launch.sh (`bash prep/launch.sh` ran it)."""
    if "LOCAL" in args:  # an env name the command line cannot spell: from a config of the user's search path
        (tmp_path / "conf" / "local").mkdir(parents=True)
        (tmp_path / "conf" / "local" / "default.yaml").write_text('# @package _global_\ncluster:\n  env:\n'
                                                                  '    "X; id": "1"\n')
        args = [a for a in args if a != "LOCAL"] + [f"hydra.searchpath=[file://{tmp_path}/conf]"]
    refused(tmp_path, *args, expect=expect)
    assert not (ROOT / "pwned").exists()


def test_a_percent_in_run_dir_is_refused_for_slurm(tmp_path):
    """sbatch expands %j in --output: the job failed with no log."""
    run = tmp_path / "a%jb"
    r = cli("cluster=slurm", "dry_run=true", "stage=prep", f"run.dir={run}", timeout=120)
    assert r.returncode == 2 and f"run.dir={run}: holds '%'" in r.stderr, r.stderr
    assert not run.exists()


# ---------------------------------------------------------------- inputs refused at validation (issue 18 item 5)
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A real tiny .nemo (embedding of 512 rows, its own 400-piece tokenizer inside), one of 4096 rows,
    and a 1000-piece tokenizer of another model: all trained and saved by the kit's own code."""
    import torch

    from data_prep.sources import iter_records
    from data_prep.tokenizers import train_sentencepiece
    from modeling import build_model, presets, save_nemo
    from tests.kit import compose_cfg

    d = tmp_path_factory.mktemp("ckpt")
    data = compose_cfg([]).data
    texts = [r["chosen"] for _, _, r in iter_records(data, "train") if isinstance(r, dict)]
    tok400 = train_sentencepiece(iter(texts), 400, str(d / "tok400.model"))
    tok1000 = train_sentencepiece(iter(texts), 1000, str(d / "tok1000.model"))
    out = {"tok400": tok400, "tok1000": tok1000}
    for rows in (512, 4096):
        torch.manual_seed(0)
        m = build_model(presets.tiny_gpt(), vocab_size=rows)
        out[rows] = save_nemo(m, str(d / f"v{rows}.nemo"), tokenizer_path=tok400)
    return out


def _tar_with_config(path: Path, text: str) -> Path:
    import io
    import tarfile

    with tarfile.open(path, "w") as t:
        info = tarfile.TarInfo("./model_config.yaml")
        info.size = len(text.encode())
        t.addfile(info, io.BytesIO(text.encode()))
    return path


@pytest.mark.parametrize("kind, expect", [
    ("truncated", "truncated: member"),
    ("bad_yaml", "model_config.yaml: not valid YAML"),  # modeling.nemo_io's words (the one .nemo reader)
    ("a_list", "model_config.yaml: expected a mapping of NeMo keys, got a list"),
    ("tokenizer_list", "model_config.yaml: 'tokenizer' holds a list, not a mapping"),
])
def test_a_malformed_nemo_is_refused_at_validation_naming_key_and_file(tmp_path, checkpoints, kind, expect):
    """Each used to fail at run time, after prep ran (tarfile.ReadError, ParserError, 'list' object has
    no attribute 'items')."""
    bad = tmp_path / f"{kind}.nemo"
    if kind == "truncated":
        data = Path(checkpoints[512]).read_bytes()
        bad.write_bytes(data[: len(data) * 2 // 3])
    else:
        _tar_with_config(bad, {"bad_yaml": "a: [b\nc: :\n", "a_list": "- a\n- b\n",
                               "tokenizer_list": "hidden_size: 8\ntokenizer: [a, b]\n"}[kind])
    refused(tmp_path, "stage=prep,rm", f"model.restore_from_path={bad}",
            expect=f"model.restore_from_path={bad}: {expect}")


@pytest.mark.parametrize("args, expect", [
    (["data.tokenizer.model=TOK1000"], "data.tokenizer.model=TOK1000: its vocabulary has 1000 tokens, but the "
                                       "embedding of model.restore_from_path=V512 has 512 rows: token ids past 511 do not fit"),
    ([], "data.tokenizer.vocab_size=8000: prep would train a new BPE of up to 8000 tokens (data.tokenizer.model is "
         "null), but the embedding of model.restore_from_path=V512 has 512 rows"),
    (["model.restore_from_path=V4096", "data.tokenizer.model=TOK400"],
     "data.tokenizer.model=TOK400: its vocabulary has 400 tokens, but the embedding of model.restore_from_path="
     "V4096 has 4096 rows: a tokenizer of another model"),
])
def test_a_tokenizer_that_does_not_fit_the_models_embedding_is_refused(tmp_path, checkpoints, args, expect):
    """Larger: IndexError mid-stage; much smaller: silent training with a foreign tokenizer."""
    names = {"TOK1000": checkpoints["tok1000"], "TOK400": checkpoints["tok400"], "V512": checkpoints[512],
             "V4096": checkpoints[4096]}
    sub = lambda s: functools.reduce(lambda acc, kv: acc.replace(kv[0], str(kv[1])), names.items(), s)  # noqa: E731
    refused(tmp_path, "stage=prep,rm", f"model.restore_from_path={checkpoints[512]}", *[sub(a) for a in args],
            expect=sub(expect))


def test_the_checkpoints_own_tokenizer_is_accepted(tmp_path, checkpoints):
    r = cli("stage=prep,rm", "dry_run=true", f"run.dir={tmp_path}/run", f"model.restore_from_path={checkpoints[512]}",
            "data.tokenizer.library=nemo", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "do not fit" not in r.stdout + r.stderr and "another model" not in r.stdout + r.stderr


@pytest.mark.parametrize("size, expect", [
    (100, "data.tokenizer.vocab_size=100: a byte-fallback BPE needs more than 261 pieces"),
    (300, "data.tokenizer.vocab_size=300: the training text needs at least 313 pieces (261 byte and special "
          "pieces + 52 characters covering 99.95% of it); set data.tokenizer.vocab_size=313 or more"),
])
def test_a_vocab_size_the_corpus_cannot_train_is_refused_with_what_fits(tmp_path, size, expect):
    """sentencepiece's 'INTERNAL: ... Vocabulary size is smaller than required_chars. 300 vs 313' after
    the JSONL step ran. 313 is what sentencepiece itself asks for on the embedded sample."""
    refused(tmp_path, "stage=prep", f"data.tokenizer.vocab_size={size}", expect=expect)


# ---------------------------------------------------------------- validation says everything, before anything runs
def test_a_plus_key_typo_is_refused_with_the_closest_key(tmp_path):
    """`+rm.model.optm.lr=1e-4` passed, wrote a run directory, then every stage failed with a 50-line
    OmegaConf traceback."""
    err = refused(tmp_path, "+rm.model.optm.lr=1e-4", expect="+rm.model.optm.lr: adds a key the schema does not have")
    assert "Did you mean 'optim'?" in err
    assert cli("+cluster.env.NCCL_DEBUG=INFO", "stage=prep", "dry_run=true", f"run.dir={tmp_path}/ok").returncode == 0


def test_every_problem_is_reported_at_once(tmp_path):
    """A type error on the command line hid a bad batch size, a missing path and a missing reward model."""
    err = refused(tmp_path, "stage=prep,rm,eval", "rm.model.micro_batch_size=two", "rm.model.global_batch_size=36",
                  "data.source=local", f"data.path={tmp_path}/nope.jsonl", f"eval.rm.restore_from_path={tmp_path}/rm.nemo",
                  expect="rm.model.micro_batch_size='two'")
    for part in ("rm.model.global_batch_size=36 is not divisible", f"data.path={tmp_path}/nope.jsonl: no such file",
                 f"eval.rm.restore_from_path: {tmp_path}/rm.nemo does not exist"):
        assert part in err, err


@pytest.mark.parametrize("args, expect", [
    (["ppo.model.ppo.num_rollout_samples=48"],
     "ppo.model.global_batch_size=32: ppo.model.ppo.num_rollout_samples=48 (48 per rank x 1 ranks) do not split "
     "into whole optimizer batches of 32 (32 per rank)"),
    (["ppo.model.ppo.num_rollout_samples=64", "cluster.processes_per_node=2", "ppo.critic.global_batch_size=48",
      "ppo.critic.micro_batch_size=8", "ppo.model.ppo.rollout_micro_batch_size=16"],
     "ppo.critic.global_batch_size=48: ppo.model.ppo.num_rollout_samples=64 (32 per rank x 2 ranks) do not split "
     "into whole optimizer batches of 48 (24 per rank)"),
])
def test_ppo_batch_arithmetic_is_checked_before_launch(tmp_path, args, expect):
    """A run-time ValueError in ppo/optimization.py, after prep and rm had run."""
    refused(tmp_path, *args, expect=expect)


def test_eval_inputs_are_checked_before_launch(tmp_path):
    """eval's own files (issue 15's leftover), from the stage registry like every stage's."""
    err = refused(tmp_path, "stage=eval", f"eval.rm.data={tmp_path}/prefs.jsonl",
                  f"eval.rm.restore_from_path={tmp_path}/rm.nemo", f"eval.policy.reference_path={tmp_path}/ref.nemo",
                  expect=f"eval.rm.data={tmp_path}/prefs.jsonl: no such file")
    assert f"eval.policy.reference_path={tmp_path}/ref.nemo: no such file or directory" in err
    assert f"eval.rm.restore_from_path: {tmp_path}/rm.nemo does not exist" in err
