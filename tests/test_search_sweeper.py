"""Search sweepers: hparams_search=rm_optuna (Optuna, through hydra/sweeper=kit_optuna) optimises the
metric the user names (optimized_metric), and the kit checks each trial before it is launched. The real
Optuna sweeper and real rm stages on the CPU where hydra-optuna-sweeper is installed (CI installs it)."""
from __future__ import annotations

import importlib.util
import json

import pytest
from omegaconf import OmegaConf

from launcher.tracking import read_metric
from tests.kit import cli

HAS_OPTUNA = importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None
needs_optuna = pytest.mark.skipif(not HAS_OPTUNA, reason="hydra-optuna-sweeper is not installed "
                                                         "(pip install 'rlhf-kit[optuna]')")


@pytest.mark.parametrize("metric, expect", [
    ("rm/val", "optimized_metric='rm/val': expected <stage>/<split>/<metric>, e.g. rm/val/loss"),
    ("ppo/val/val_reward_mean", "optimized_metric='ppo/val/val_reward_mean': stage ppo is not run (stage=rm)"),
])
def test_the_optimized_metric_is_checked_before_anything_runs(tmp_path, metric, expect):
    r = cli("stage=rm", f"optimized_metric={metric}", f"run.dir={tmp_path}")
    assert r.returncode == 2 and expect in r.stderr, r.stderr
    assert not tmp_path.joinpath("manifest.json").exists()


@pytest.mark.skipif(HAS_OPTUNA, reason="hydra-optuna-sweeper is installed here: the search itself is tested")
def test_the_optuna_preset_without_the_plugin_says_what_to_install(tmp_path):
    r = cli("-m", "stage=rm", "hparams_search=rm_optuna", f"run.dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/s")
    assert r.returncode != 0
    assert "hydra/sweeper=kit_optuna needs hydra-optuna-sweeper: pip install 'rlhf-kit[optuna]'" in r.stderr + r.stdout


@needs_optuna
def test_a_trial_the_kit_refuses_is_never_launched(tmp_path):
    sweep = tmp_path / "sweep"
    r = cli("-m", "stage=rm", "hparams_search=rm_optuna", "hydra.sweeper.n_trials=2", "rm.model.global_batch_size=36",
            f"run.dir={tmp_path}/run", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "rm.model.global_batch_size=36 is not divisible by micro_batch_size=8" in r.stderr
    assert "(sweep point #0: rm.model.optim.lr=" in r.stderr and "Traceback" not in r.stderr
    assert "Launching" not in r.stdout and not (sweep / "0").exists()


@needs_optuna
def test_optuna_minimises_the_reward_models_validation_loss_on_the_cpu(tmp_path):
    """The shipped hparams_search example, 2 trials of 5 steps on the quickstart's data (prepared once)."""
    assert cli("stage=prep", f"run.dir={tmp_path}/run").returncode == 0
    sweep = tmp_path / "sweep"
    r = cli("-m", "stage=rm", "hparams_search=rm_optuna", "hydra.sweeper.n_trials=2", "rm.trainer.rm.max_steps=5",
            f"run.dir={tmp_path}/run", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "#0 : rm.model.optim.lr=" in r.stdout and "#1 : rm.model.optim.lr=" in r.stdout
    losses = [read_metric(sweep / str(n), "rm/val/loss") for n in (0, 1)]
    lrs = [OmegaConf.load(sweep / str(n) / "rm" / "config.yaml").rm.model.optim.lr for n in (0, 1)]
    assert lrs[0] != lrs[1] and all(1e-4 <= lr <= 3e-3 for lr in lrs)
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == min(losses)
    assert best.best_params["rm.model.optim.lr"] == lrs[losses.index(min(losses))]
    results = [json.loads(line) for line in (sweep / "sweep_results.jsonl").read_text().splitlines()]
    assert [p["optimized_metric"]["rm/val/loss"] for p in sorted(results, key=lambda p: p["num"])] == losses
    assert all(p["stages"]["rm"]["status"] == "succeeded" for p in results)


@needs_optuna
def test_a_plain_optuna_sweeper_gets_the_kits_check_of_each_trial(tmp_path):
    """`hydra/sweeper=optuna` (Optuna's own name, not kit_optuna) launched a trial the kit refuses, which
    then failed in its job; it now runs as kit_optuna: refused before launch, exit 2, nothing written."""
    sweep = tmp_path / "sweep"
    r = cli("-m", "stage=rm", "hparams_search=rm_optuna", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2",
            "rm.model.global_batch_size=36", f"run.dir={tmp_path}/run", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "OptunaSweeper runs as the kit's KitOptunaSweeper" in r.stdout
    assert "rm.model.global_batch_size=36 is not divisible" in r.stderr and "(sweep point #0: " in r.stderr
    assert "Launching" not in r.stdout and not sweep.exists() and not (tmp_path / "run").exists()
