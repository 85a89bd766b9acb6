"""What Hydra users of training code expect from a template (lightning-hydra-template's conventions):
`+experiment=`, `optional local` user overrides, `debug=fdr|overfit`, `logger=tensorboard|wandb|mlflow`.
Real config tree, real CLI and stages, real wandb and mlflow where they are installed."""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from launcher.tracking import MetricsForwarder, read_metric
from tests.kit import ROOT, cli, compose_cfg

HAS = {name: importlib.util.find_spec(name) is not None for name in ("wandb", "mlflow")}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def rows(path: Path, split: str):
    return [json.loads(line) for line in path.read_text().splitlines() if json.loads(line)["split"] == split]


def test_experiment_presets_are_selectable_with_plus():
    r = cli("--cfg", "job", "+experiment=gpt2b_hh", "model.restore_from_path=/x.nemo")
    assert r.returncode == 0, r.stderr
    cfg = OmegaConf.create(r.stdout)
    assert cfg.run.name == "gpt2b_hh" and cfg.model.hidden_size == 2048


def test_optional_local_overrides_sit_between_the_preset_and_the_command_line(tmp_path):
    """A local/default.yaml (conf/local/, not in git; here from a search-path folder) beats the experiment
    preset; the command line beats it; without one nothing changes."""
    write(tmp_path / "local" / "default.yaml", "# @package _global_\nrun:\n  name: mine\ncluster:\n  account: abc\n")
    sp = f"hydra.searchpath=[file://{tmp_path}]"
    cfg = OmegaConf.create(cli("--cfg", "job", sp).stdout)
    assert (cfg.run.name, cfg.cluster.account) == ("mine", "abc")
    cfg = OmegaConf.create(cli("--cfg", "job", sp, "run.name=cli").stdout)
    assert (cfg.run.name, cfg.cluster.account) == ("cli", "abc")
    assert compose_cfg([]).run.name == "quickstart"


def test_debug_fdr_runs_the_pipeline_in_two_steps_with_anomaly_detection(tmp_path):
    r = cli("debug=fdr", f"run.dir={tmp_path}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    stages = json.loads((tmp_path / "manifest.json").read_text())["stages"]
    assert [stages[s]["status"] for s in ("prep", "rm", "ppo")] == ["succeeded"] * 3
    for stage in ("rm", "ppo"):
        assert f"stage {stage}: torch.autograd anomaly detection on" in r.stdout
        assert [row["step"] for row in rows(tmp_path / stage / "metrics.jsonl", "train")] == [1, 2]
    assert max(row["pairs"] for row in rows(tmp_path / "rm" / "metrics.jsonl", "train")) == 4
    assert compose_cfg(["debug=fdr"]).run.dir == "results/debug_fdr/quickstart", "a run folder of its own"


def test_debug_overfit_drives_the_reward_models_train_loss_down(tmp_path):
    r = cli("debug=overfit", "stage=prep,rm", "optimized_metric=rm/train/loss", f"run.dir={tmp_path}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    train = rows(tmp_path / "rm" / "metrics.jsonl", "train")
    assert len(train) == 30 and {row["pairs"] for row in train} == {8}, "one batch of 8 pairs, 30 times"
    assert train[-1]["loss"] < 0.05 < train[0]["loss"] and train[-1]["accuracy"] == 1.0
    assert read_metric(tmp_path, "rm/train/loss") == train[-1]["loss"]
    assert f"optimized_metric rm/train/loss = {train[-1]['loss']}" in r.stdout  # what a search sweeper gets


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_logger_whose_package_is_missing_is_refused_before_anything_runs(tmp_path, name):
    if HAS[name]:
        pytest.skip(f"{name} is installed here: the offline test below covers it")
    r = cli(f"logger={name}", "stage=rm", "dry_run=true", f"run.dir={tmp_path}")
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"logger={name} needs the {name} package, which is not installed: pip install 'rlhf-kit[{name}]'" in r.stderr
    assert not tmp_path.joinpath("dry_run").exists()
    assert OmegaConf.create(cli("--cfg", "job", f"logger={name}").stdout).logger.name == name  # it composes


def _forward(tmp_path: Path, name: str, fail: bool = False) -> Path:
    """A stage's metrics.jsonl as MetricsLogger writes it, fed through the forwarder while it grows:
    a row left from an earlier run (skipped), rows of two splits, a row caught half-written."""
    cfg = compose_cfg([f"logger={name}", "logger.offline=true", f"run.dir={tmp_path}", "run.name=t"])
    metrics = write(tmp_path / "rm" / "metrics.jsonl",
                    json.dumps({"step": 9, "split": "train", "time": time.time() - 600, "stale_key": 1.0}) + "\n")
    try:
        with MetricsForwarder(cfg, "rm", tmp_path / "rm", interval_s=0.1):
            metrics.write_text("")
            for step in (1, 2):
                with metrics.open("a") as f:
                    f.write(json.dumps({"step": step, "split": "train", "time": time.time(), "loss": 1.0 / step}) + "\n")
                    f.write(json.dumps({"step": step, "split": "val", "time": time.time(), "accuracy": 0.5 * step})[:20])
                    f.flush()
                    time.sleep(0.3)  # the forwarder sees half a row and must wait for the rest
                    f.write(json.dumps({"step": step, "split": "val", "time": time.time(), "accuracy": 0.5 * step})[20:]
                            + "\n")
            if fail:
                raise RuntimeError("the stage failed")
    except RuntimeError:
        assert fail
    return tmp_path


@pytest.mark.skipif(not HAS["mlflow"], reason="mlflow is not installed (pip install 'rlhf-kit[mlflow]')")
@pytest.mark.parametrize("fail", [False, True])
def test_mlflow_offline_gets_every_row_of_the_stage(tmp_path, fail):
    from mlflow.tracking import MlflowClient

    _forward(tmp_path, "mlflow", fail)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("rlhf-kit").experiment_id])
    assert run.info.run_name == "t-rm" and run.data.tags["rlhf_kit.stage"] == "rm"
    assert run.info.status == ("FAILED" if fail else "FINISHED")
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == [(1, 1.0), (2, 0.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/accuracy")] == [(1, 0.5), (2, 1.0)]
    assert "train/stale_key" not in run.data.metrics
    assert (tmp_path / "mlflow-artifacts").is_dir() and not (ROOT / "mlruns").exists(), "nothing written in the cwd"


@pytest.mark.skipif(not HAS["wandb"], reason="wandb is not installed (pip install 'rlhf-kit[wandb]')")
def test_wandb_offline_gets_every_row_of_the_stage(tmp_path):
    _forward(tmp_path, "wandb")
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    data = run_file.read_bytes()
    assert b"train/loss" in data and b"val/accuracy" in data and b"stale_key" not in data


@pytest.mark.skipif(not HAS["wandb"], reason="wandb is not installed (pip install 'rlhf-kit[wandb]')")
def test_a_stage_run_with_logger_wandb_offline(tmp_path):
    """The stage runner feeds the logger: the real rm stage, its rows in an offline wandb run."""
    r = cli("debug=fdr", "stage=prep,rm", "logger=wandb", "logger.offline=true", f"run.dir={tmp_path}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"train/loss" in run_file.read_bytes() and b"test/accuracy" in run_file.read_bytes()
