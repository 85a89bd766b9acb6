"""Config layer: every preset x cluster composes, validates and dry-runs through the real CLI."""
from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from launcher.plan import make_plan
from launcher.stages import parse_stage_selection
from launcher.validate import validate
from tests.kit import CLUSTERS, PRESETS, ROOT, cli, compose_cfg, preset_overrides


def test_presets_and_clusters_exist():
    assert {"quickstart", "gpt2b_hh", "smollm2_hh"} <= set(PRESETS)
    assert {"local", "slurm"} <= set(CLUSTERS)


@pytest.mark.parametrize("cluster", CLUSTERS)
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_and_cluster_composes_and_validates(preset, cluster, tmp_path):
    cfg = compose_cfg([f"experiment={preset}", f"cluster={cluster}", f"run.dir={tmp_path}/run"]
                      + preset_overrides(preset, tmp_path))
    assert cfg.cluster.name == cluster
    assert cfg.run.name == preset
    stages = parse_stage_selection(cfg.stage)
    validate(cfg, stages)
    jobs = make_plan(cfg, stages, tmp_path / "run", force=False, dry_run=False)
    assert [j.stage for j in jobs] == ["prep", "rm", "ppo"]
    assert jobs[1].after == ["prep"] and jobs[2].after == ["prep", "rm"]
    assert not (tmp_path / "run").exists(), "planning must not write into the run directory"


def test_hands_on_overrides_are_built_in():
    cfg = compose_cfg(["experiment=gpt2b_hh", "model.restore_from_path=/x.nemo"])
    assert cfg.rm.trainer.rm.max_epochs == 1
    assert cfg.rm.exp_manager.checkpoint_callback_params.always_save_nemo is True
    assert cfg.rm.exp_manager.checkpoint_callback_params.save_nemo_on_train_end is True
    assert cfg.rm.model.rampup_batch_size is None
    assert cfg.rm.pretrained_checkpoint.restore_from_path == "/x.nemo"
    assert (cfg.model.precision, cfg.model.tensor_model_parallel_size) == ("bf16", 1)
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.ffn_hidden_size) == (24, 2048, 5440)
    assert cfg.model.tokenizer.model == "/x.nemo"  # the sentencepiece model inside the .nemo


def test_command_line_group_choice_beats_the_preset():
    cfg = compose_cfg(["model=smollm2_135m"])  # quickstart pins model=tiny
    assert cfg.model.name == "smollm2_135m" and cfg.run.name == "quickstart"


def test_nemo_key_overrides_apply_verbatim():
    cfg = compose_cfg(["rm.model.optim.lr=5e-6", "rm.trainer.rm.max_epochs=3",
                       "ppo.model.ppo.num_rollout_samples=64", "ppo.trainer.ppo.initial_policy_kl_penalty=0.05"])
    assert cfg.rm.model.optim.lr == 5e-6 and cfg.rm.trainer.rm.max_epochs == 3
    assert cfg.ppo.model.ppo.num_rollout_samples == 64 and cfg.ppo.trainer.ppo.initial_policy_kl_penalty == 0.05


@pytest.mark.parametrize("cluster", CLUSTERS)
@pytest.mark.parametrize("preset", PRESETS)
def test_dry_run_renders_every_preset_and_cluster(preset, cluster, tmp_path):
    run_dir = tmp_path / "run"
    r = cli(f"experiment={preset}", f"cluster={cluster}", f"run.dir={run_dir}", "dry_run=true",
            *preset_overrides(preset, tmp_path))
    assert r.returncode == 0, r.stderr
    for stage in ("prep", "rm", "ppo"):
        assert f"# ===== stage {stage}: {run_dir}/{stage}/config.yaml" in r.stdout
        config = OmegaConf.load(run_dir / "dry_run" / stage / "config.yaml")
        assert config.stage == stage and config.run.stage_dir == str(run_dir / stage)
        script = (run_dir / "dry_run" / stage / ("submit.sbatch" if cluster == "slurm" else "launch.sh")).read_text()
        assert f"launcher.stage_runner --run-dir {run_dir} --stage {stage}" in script
        assert script in r.stdout
    assert not (run_dir / "manifest.json").exists(), "a dry run records nothing"
    assert not (run_dir / "prep").exists()


def test_dry_run_shows_the_exact_config_including_overrides(tmp_path):
    r = cli("stage=rm", "dry_run=true", f"run.dir={tmp_path}", "rm.model.optim.lr=0.00123")
    assert r.returncode == 0, r.stderr
    cfg = OmegaConf.load(tmp_path / "dry_run" / "rm" / "config.yaml")
    assert cfg.rm.model.optim.lr == 0.00123
    assert cfg.rm.exp_manager.explicit_log_dir == str(tmp_path / "rm")
    assert "NOT AVAILABLE" in r.stdout  # rm alone, nothing prepared: said, not hidden


def test_help_and_cfg_job_behave_as_hydra():
    r = cli("--help")
    assert r.returncode == 0
    for group in ("model:", "cluster:", "experiment:"):
        assert group in r.stdout
    assert "gpt_2b" in r.stdout and "smollm2_135m" in r.stdout
    r = cli("--cfg", "job", "model=gpt_2b", "model.restore_from_path=/a.nemo")
    assert r.returncode == 0
    assert OmegaConf.create(r.stdout).model.hidden_size == 2048


def test_shell_completion_is_available():
    r = cli("--shell-completion", "install=bash")
    assert r.returncode == 0 and "complete" in r.stdout


def test_the_launcher_never_imports_torch():
    """Composing, validating and dry-running must stay fast: stage packages' __init__ and config
    modules are imported by the launcher and must not pull in torch (import it inside run())."""
    import subprocess
    import sys

    code = ("import sys, launcher.main, launcher.stage_runner, launcher.executors; "
            "print(sorted(m for m in ('torch', 'transformers', 'sentencepiece') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_stage_lists_run_in_pipeline_order(tmp_path):
    r = cli("stage=ppo,rm", "dry_run=true", f"run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    rendered = [line.split(":")[0] for line in r.stdout.splitlines() if line.startswith("# ===== stage") and "launch" in line]
    assert rendered == ["# ===== stage rm", "# ===== stage ppo"]


def test_toy_learning_rates_stay_with_the_tiny_model():
    """The quickstart's default model is tiny, whose random init needs large learning rates. Choosing
    a real model on the command line (the hands-on's `stage=rm model=gpt_2b ...`) must give NeMo's."""
    tiny = compose_cfg([])
    assert tiny.model.name == "tiny" and tiny.rm.model.optim.lr == 1e-3
    for model in ("gpt_2b", "smollm2_135m"):
        cfg = compose_cfg([f"model={model}", "model.restore_from_path=/x.nemo"])
        assert cfg.rm.model.optim.lr == 9e-6 and cfg.rm.model.optim.sched.min_lr == 9e-7
        assert cfg.ppo.model.optim.lr == 9e-7 and cfg.ppo.model.ppo.ppo_epochs == 1
        assert cfg.run.name == "quickstart" and cfg.data.source == "sample"

