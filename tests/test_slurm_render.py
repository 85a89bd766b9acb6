"""The Slurm executor without a cluster: golden batch scripts for the dry run, resource translation and
the option table (unknown options fail before submission, listing the valid ones)."""
from __future__ import annotations

import os

import pytest

from launcher.errors import ConfigError
from launcher.slurm import PARAMETERS, SlurmExecutor, slurm_minutes
from launcher.config import ClusterConfig
from omegaconf import OmegaConf
from tests.kit import ROOT, cli

GOLDEN = ROOT / "tests" / "slurm" / "golden"
EVERYTHING = ["cluster=slurm", "cluster.nodes=2", "cluster.gpus_per_node=2", "cluster.partition=gpu",
              "cluster.account=abc", "cluster.qos=high", "cluster.time=1-00:00:00", "cluster.mem=200G",
              "cluster.exclusive=true", "cluster.constraint=h100", "cluster.container_image=nvcr.io/nvidia/pytorch:24.05-py3",
              "cluster.container_mounts=[/data:/data]", "+cluster.env.NCCL_DEBUG=INFO",
              "cluster.setup=['module load cuda/12.4']", "+cluster.sbatch_args.reservation=rlhf",
              "cluster.srun_args=['--mpi=pmix']", "cluster.python=python", "cluster.signal_delay_s=300",
              "ppo.model.ppo.num_rollout_samples=64", "run.name=golden"]


@pytest.mark.parametrize("stage", ["prep", "rm", "ppo"])
def test_dry_run_prints_the_golden_batch_script(tmp_path, stage):
    run = tmp_path / "run"
    r = cli("stage=all", "dry_run=true", f"run.dir={run}", *EVERYTHING)
    assert r.returncode == 0, r.stderr
    text = (run / "dry_run" / stage / "submit.sbatch").read_text()
    assert text in r.stdout
    text = text.replace(str(run), "{RUN}").replace(os.getcwd(), "{CWD}")
    golden = GOLDEN / f"{stage}.sbatch"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"batch script changed; if on purpose: UPDATE_GOLDEN=1 pytest {__file__}"


def executor(**kw) -> SlurmExecutor:
    return SlurmExecutor(OmegaConf.structured(ClusterConfig(name="slurm", **kw)))


def test_unknown_sbatch_option_fails_listing_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        executor(sbatch_args={"reservaton": "x"})
    msg = e.value.render()
    assert "cluster.sbatch_args.reservaton: not an sbatch option. Did you mean 'reservation'?" in msg
    assert "Valid options: " in msg and "mail-user" in msg


def test_options_the_kit_sets_point_to_their_key():
    with pytest.raises(ConfigError) as e:
        executor(sbatch_args={"gpus-per-node": "8", "dependency": "afterany:1"}, srun_args=["oops"])
    msg = e.value.render()
    assert "cluster.sbatch_args.gpus-per-node: set by the kit; use cluster.gpus_per_node" in msg
    assert "cluster.sbatch_args.dependency: set by the kit" in msg and "'oops' is not an option" in msg


def test_every_cluster_key_is_in_the_parameter_table():
    keys = set(ClusterConfig.__dataclass_fields__) - {"name", "gpu_option"}
    assert keys == set(PARAMETERS), keys ^ set(PARAMETERS)


@pytest.mark.parametrize("text, minutes", [("30", 30), ("1:30", 2), ("04:00:00", 240), ("1-0", 1440),
                                           ("2-03:04", 3064), ("0-00:00:30", 1)])
def test_slurm_time_in_minutes(text, minutes):
    assert slurm_minutes(text) == minutes


def test_bad_time_is_a_config_error():
    with pytest.raises(ConfigError, match="not a Slurm time"):
        executor(time="1:2:3:4")


def test_a_completing_job_reports_how_it_ended(tmp_path, monkeypatch):
    """squeue shows a cancelled job as COMPLETING while its processes are cleaned up, when sacct
    already says CANCELLED: status must say CANCELLED (CI saw the real cluster in that instant). The
    instant cannot be held open on a real cluster, so squeue and sacct are stand-in scripts here."""
    from launcher.slurm import job_info

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/bin/sh\necho '3|COMPLETING|None|-|0:01|node1'\necho '4|COMPLETING|None|-|0:02|node1'\n")
    # job 3: sacct knows the end; job 4: sacct still lags (RUNNING): the live COMPLETING row stays
    (bin_dir / "sacct").write_text("#!/bin/sh\necho '3|CANCELLED by 0|None|0:0|00:00:01|node1'\n"
                                   "echo '4|RUNNING|None|0:0|00:00:02|node1'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    info = job_info(["3", "4"])
    assert info["3"]["State"] == "CANCELLED by 0"
    assert info["4"]["State"] == "COMPLETING"


def test_dry_run_renders_without_slurm_installed(tmp_path):
    """A new user without Slurm: the dry run still prints each batch script (submitit alone refuses
    without srun on PATH). PATH holds nothing here, so this also holds where Slurm is installed (CI)."""
    run, empty = tmp_path / "run", tmp_path / "empty_bin"
    empty.mkdir()
    r = cli("stage=all", "dry_run=true", f"run.dir={run}", "cluster=slurm", env={"PATH": str(empty)})
    assert r.returncode == 0, r.stderr
    for stage in ("prep", "rm", "ppo"):
        text = (run / "dry_run" / stage / "submit.sbatch").read_text()
        assert f"--stage {stage}" in text and "#SBATCH" in text


def test_submitting_without_slurm_is_refused_before_anything_is_written(tmp_path):
    run, empty = tmp_path / "run", tmp_path / "empty_bin"
    empty.mkdir()
    r = cli("stage=prep", f"run.dir={run}", "cluster=slurm", env={"PATH": str(empty)})
    assert r.returncode == 2, r.stderr
    assert "Slurm is not installed here (no sbatch on PATH)" in r.stderr and "dry_run=true" in r.stderr
    assert "Traceback" not in r.stderr and not run.exists()
