"""The local executor end to end: real subprocesses, the real prep stage, the manifest on disk."""
from __future__ import annotations

import json
import re
import os

from omegaconf import OmegaConf

from launcher.manifest import Manifest
from tests.kit import cli


def manifest(run_dir):
    return json.loads((run_dir / "manifest.json").read_text())


def test_prep_runs_through_the_real_executor(tmp_path):
    r = cli("stage=prep", f"run.dir={tmp_path}")
    assert r.returncode == 0, r.stdout + r.stderr
    entry = manifest(tmp_path)["stages"]["prep"]
    assert entry["status"] == "succeeded" and entry["started"] and entry["finished"]
    assert entry["job_ids"] and entry["fingerprint"]
    prefix = entry["artifacts"]["data_prefix"]["train"]
    assert os.path.exists(prefix + ".bin") and os.path.exists(prefix + ".idx")
    assert os.path.exists(entry["artifacts"]["tokenizer"])
    stage_dir = tmp_path / "prep"
    cfg = OmegaConf.load(stage_dir / "config.yaml")
    assert cfg.stage == "prep" and cfg.run.stage_dir == str(stage_dir)
    assert (stage_dir / "launch.sh").read_text().startswith("#!/usr/bin/env bash")
    log = (stage_dir / "log.txt").read_text()
    assert log and log in r.stdout, "the stage log is captured in its folder and streamed to the terminal"
    assert "stage=prep" in manifest(tmp_path)["command"]


def test_rerun_skips_up_to_date_stages_and_an_override_reruns(tmp_path):
    assert cli("stage=prep", f"run.dir={tmp_path}").returncode == 0
    bin_path = manifest(tmp_path)["stages"]["prep"]["artifacts"]["data_prefix"]["train"] + ".bin"
    mtime = os.stat(bin_path).st_mtime_ns

    r = cli("stage=prep", f"run.dir={tmp_path}")
    assert r.returncode == 0 and "stage prep: up to date" in r.stdout
    assert manifest(tmp_path)["stages"]["prep"]["status"] == "skipped"
    assert os.stat(bin_path).st_mtime_ns == mtime

    r = cli("stage=prep", f"run.dir={tmp_path}", "data.max_pairs=100")  # a changed key re-runs the stage
    assert r.returncode == 0 and "stage prep: up to date" not in r.stdout
    assert manifest(tmp_path)["stages"]["prep"]["status"] == "succeeded"

    r = cli("stage=prep", f"run.dir={tmp_path}", "data.max_pairs=100", "force=true")
    assert r.returncode == 0 and "stage prep: up to date" not in r.stdout


def test_a_recorded_stage_hands_its_artifacts_to_a_later_run(tmp_path):
    assert cli("stage=prep", f"run.dir={tmp_path}").returncode == 0
    prep = manifest(tmp_path)["stages"]["prep"]["artifacts"]
    r = cli("stage=rm", f"run.dir={tmp_path}", "dry_run=true")
    assert r.returncode == 0, r.stderr
    cfg = OmegaConf.load(tmp_path / "dry_run" / "rm" / "config.yaml")
    assert list(cfg.rm.model.data.data_prefix.train) == [prep["data_prefix"]["train"]]
    assert list(cfg.rm.model.data.data_prefix.validation) == [prep["data_prefix"]["validation"]]
    assert cfg.data.tokenizer.model == prep["tokenizer"]
    assert "filled at run time" not in r.stdout


def test_a_failing_stage_is_recorded_and_stops_the_chain(tmp_path):
    bogus = tmp_path / "not_a_tokenizer.model"
    bogus.write_text("this is not a sentencepiece model\n")
    run_dir = tmp_path / "run"
    r = cli("stage=all", f"run.dir={run_dir}", "data.tokenizer.library=sentencepiece", f"data.tokenizer.model={bogus}")
    assert r.returncode == 1, r.stdout + r.stderr
    stages = manifest(run_dir)["stages"]
    assert stages["prep"]["status"] == "failed" and stages["prep"]["error"]
    assert "rm" not in stages and "ppo" not in stages, "nothing after a failed stage starts"
    assert "stage rm not started" in r.stdout


def test_manifest_updates_are_atomic_and_keep_other_stages(tmp_path):
    m = Manifest(tmp_path)
    m.update_stage("prep", status="succeeded", artifacts={"x": "/a"})
    m.update_stage("rm", status="running")
    data = m.read()
    assert data["stages"]["prep"]["artifacts"] == {"x": "/a"} and data["stages"]["rm"]["status"] == "running"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    try:
        m.update_stage("rm", status="exploded")
    except ValueError as e:
        assert "exploded" in str(e)
    assert m.stage("rm")["status"] == "running"


def test_ctrl_c_stops_the_stage_cleanly_and_is_recorded(tmp_path):
    """SIGINT to the process group, as a terminal's Ctrl-C sends it, while prep is running."""
    import signal
    import subprocess
    import sys
    import time

    from tests.kit import HH_TEST, ROOT

    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "launcher" / "main.py"), "stage=prep,rm", f"run.dir={run_dir}",
                             "data.source=local", f"data.path={HH_TEST}", "data.tokenizer.vocab_size=16000"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        path = run_dir / "manifest.json"
        if path.exists() and json.loads(path.read_text())["stages"].get("prep", {}).get("status") == "running":
            break
        time.sleep(0.02)
    else:
        proc.kill()
        raise AssertionError("prep never started")
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out.decode()
    stages = manifest(run_dir)["stages"]
    assert stages["prep"]["status"] == "cancelled" and stages["prep"]["finished"], stages
    assert "rm" not in stages
    prep_dir = run_dir / "prep"
    assert not (prep_dir / "hh_comparison_train_text_document.idx").exists(), "nothing that looks complete"


def test_a_sweep_point_uses_the_base_runs_prep(tmp_path):
    """`stage=prep` once, then `-m stage=rm ...`: each point finds prep's data in the base run."""
    assert cli("stage=prep", f"run.dir={tmp_path}").returncode == 0
    prep = manifest(tmp_path)["stages"]["prep"]["artifacts"]
    r = cli("-m", "stage=rm", "dry_run=true", f"run.dir={tmp_path}", "rm.model.optim.lr=1e-3,5e-4",
            f"hydra.sweep.dir={tmp_path}/sweep")
    assert r.returncode == 0, r.stdout + r.stderr
    for point in ("0", "1"):
        cfg = OmegaConf.load(tmp_path / "sweep" / point / "dry_run" / "rm" / "config.yaml")
        assert list(cfg.rm.model.data.data_prefix.train) == [prep["data_prefix"]["train"]]
    assert {OmegaConf.load(tmp_path / "sweep" / p / "dry_run" / "rm" / "config.yaml").rm.model.optim.lr
            for p in ("0", "1")} == {1e-3, 5e-4}


def test_a_local_stage_that_checkpointed_on_a_signal_is_recorded_as_stopped(tmp_path):
    """Exit 75 (checkpointed on SIGTERM/SIGUSR1) is a resumable stop, not a failure."""
    import subprocess
    import sys
    import time
    import signal as sig

    from tests.kit import ROOT

    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "launcher" / "main.py"), "stage=prep,rm", f"run.dir={run_dir}",
                             "rm.trainer.rm.max_epochs=3"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline:
        path = run_dir / "manifest.json"
        log = run_dir / "rm" / "log.txt"
        if path.exists() and json.loads(path.read_text())["stages"].get("rm", {}).get("status") == "running" \
                and log.exists() and re.search(r"step \d+/\d+", log.read_text()):  # training (not "optimizer steps")
            break
        time.sleep(0.1)
    else:
        proc.kill()
        raise AssertionError("rm never started training")
    rm_pid = int(json.loads((run_dir / "manifest.json").read_text())["stages"]["rm"]["job_ids"][0])
    os.kill(rm_pid, sig.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 75, out.decode()[-3000:]
    entry = manifest(run_dir)["stages"]["rm"]
    assert entry["status"] == "cancelled" and "resume" in entry["error"], entry
    assert list((run_dir / "rm" / "checkpoints").glob("*")), "a checkpoint was written"


def test_stages_run_the_checkout_that_launched_them(tmp_path):
    """`python <checkout>/launcher/main.py` from any directory: the stage processes import that checkout,
    not whichever copy of the kit pip installed (here: the one under test), nor fail to import the kit
    when none is installed (a checkout used without `pip install -e`)."""
    import shutil
    import subprocess
    import sys

    from tests.kit import ROOT

    copy = tmp_path / "other_checkout"
    packages = sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "tests")
    for name in (*packages, "hydra_plugins", "conf"):  # every package of the kit (a new stage included)
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy)
    marker = tmp_path / "imported_from.txt"
    with open(copy / "data_prep" / "__init__.py", "a") as f:  # only the copy writes the marker
        f.write("\nimport os as _os, sys as _sys\n"
                "if _os.environ.get('KIT_MARKER') and _sys.argv[0].endswith('stage_runner.py'):\n"
                "    open(_os.environ['KIT_MARKER'], 'w').write(__file__)\n")  # in the stage, not the launcher
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    r = subprocess.run([sys.executable, str(copy / "launcher" / "main.py"), "stage=prep", f"run.dir={tmp_path}/run"],
                       cwd=elsewhere, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "KIT_MARKER": str(marker)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert marker.read_text() == str(copy / "data_prep" / "__init__.py")


def test_a_failing_rank_is_named_and_its_log_shown(tmp_path):
    """Rank 1 of 2 exits 3 while rank 0 waits: the launcher stops rank 0 and reports rank 1's exit code
    and the end of its log (only rank 0 prints to the console), not the signal it sent rank 0 itself."""
    from tests.kit import ROOT

    run_dir = tmp_path / "run"
    r = cli("stage=prep,rm", f"run.dir={run_dir}", "data.max_pairs=64", "cluster.processes_per_node=2",
            f"+cluster.env.PYTHONPATH={ROOT / 'tests' / 'slurm' / 'hooks'}{os.pathsep}{ROOT}",
            "+cluster.env.KIT_TEST_HOOK=rank1fails:rm", timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 3, out[-3000:]
    entry = manifest(run_dir)["stages"]["rm"]
    assert entry["status"] == "failed", entry
    assert entry["error"] == "rank 1: exit code 3; the other ranks were stopped", entry
    assert "[hook rank1fails] rank 1 fails here" in out  # rank 1's log, shown by the launcher
    assert str(run_dir / "rm" / "log_rank1.txt") in out


def test_a_finished_rank_does_not_run_the_interpreters_teardown(tmp_path):
    """A rank whose stage finished leaves with os._exit: a crash in the teardown at interpreter exit
    (here rank 1's atexit handler aborts) cannot fail a stage whose work is done and recorded."""
    from tests.kit import ROOT

    run_dir = tmp_path / "run"
    r = cli("stage=prep,rm", f"run.dir={run_dir}", "data.max_pairs=64", "cluster.processes_per_node=2",
            f"+cluster.env.PYTHONPATH={ROOT / 'tests' / 'slurm' / 'hooks'}{os.pathsep}{ROOT}",
            "+cluster.env.KIT_TEST_HOOK=exitcrash:rm", timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert manifest(run_dir)["stages"]["rm"]["status"] == "succeeded"
