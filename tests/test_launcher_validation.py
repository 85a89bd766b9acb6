"""One test per validation rule: each names the key, exits non-zero, prints no traceback, and leaves
nothing in the run directory."""
from __future__ import annotations

import pytest

from launcher.errors import ConfigError
from launcher.main import launch
from tests.kit import cli, compose_cfg


def fails_cleanly(tmp_path, *args, expect: str):
    run_dir = tmp_path / "run"
    r = cli(f"run.dir={run_dir}", *args)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert expect in r.stderr, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not run_dir.exists(), "a rejected run must not write anything"
    return r.stderr


def test_unknown_key_suggests_the_close_match(tmp_path):
    err = fails_cleanly(tmp_path, "rm.model.optm.lr=1e-5", expect="unknown key 'rm.model.optm.lr'")
    assert "Did you mean 'optim'?" in err


def test_unknown_nested_key_suggests_the_close_match(tmp_path):
    err = fails_cleanly(tmp_path, "rm.exp_manager.checkpoint_callback_params.always_save_nemmo=true",
                        expect="always_save_nemmo")
    assert "'always_save_nemo'" in err


def test_wrong_type_names_the_key(tmp_path):
    fails_cleanly(tmp_path, "rm.model.micro_batch_size=two", expect="rm.model.micro_batch_size='two'")


def test_missing_required_value(tmp_path):
    fails_cleanly(tmp_path, "model=gpt_2b", expect="missing value for 'model.restore_from_path'")


def test_choice_with_suggestion(tmp_path):
    err = fails_cleanly(tmp_path, "data.source=hubb", expect="data.source='hubb' is not one of")
    assert "Did you mean 'hub'?" in err


def test_unknown_stage(tmp_path):
    fails_cleanly(tmp_path, "stage=reward", expect="unknown stage 'reward'")


def test_global_batch_divisible_by_micro_batch_times_data_parallel(tmp_path):
    fails_cleanly(tmp_path, "rm.model.global_batch_size=36", expect="rm.model.global_batch_size=36 is not divisible")


def test_global_batch_accounts_for_data_parallel_size(tmp_path):
    # 32 = 8 x 4 on one process, but not with 3 processes (data-parallel 3)
    fails_cleanly(tmp_path, "cluster.processes_per_node=3", expect="data-parallel size 3")


def test_profile_step_range(tmp_path):
    fails_cleanly(tmp_path, "rm.model.torch_profile.enabled=true", "rm.model.torch_profile.start_step=0",
                  expect="rm.model.torch_profile: start_step=0, end_step=12")


def test_rollout_samples_divisible(tmp_path):
    fails_cleanly(tmp_path, "ppo.model.ppo.num_rollout_samples=40", expect="num_rollout_samples=40")


def test_model_parallel_must_divide_and_is_unsupported(tmp_path):
    err = fails_cleanly(tmp_path, "model.tensor_model_parallel_size=2", expect="tensor_model_parallel_size=2")
    assert "does not divide the 1 processes" in err


def test_trainer_devices_must_match_the_cluster(tmp_path):
    fails_cleanly(tmp_path, "rm.trainer.devices=4", expect="rm.trainer.devices=4, num_nodes=1 disagree")


def test_processes_must_match_gpus(tmp_path):
    fails_cleanly(tmp_path, "cluster.gpus_per_node=2", "cluster.processes_per_node=1",
                  expect="cluster.processes_per_node=1 must equal cluster.gpus_per_node=2")


def test_slurm_time_format(tmp_path):
    fails_cleanly(tmp_path, "cluster=slurm", "cluster.time=2h", expect="cluster.time='2h' is not a Slurm time")


def test_local_data_path_must_exist(tmp_path):
    fails_cleanly(tmp_path, "data.source=local", f"data.path={tmp_path}/nope.jsonl", expect="no such file")


def test_local_source_needs_a_path(tmp_path):
    fails_cleanly(tmp_path, "data.source=local", expect="data.source=local needs data.path")


def test_checkpoint_must_exist(tmp_path):
    fails_cleanly(tmp_path, "model=gpt_2b", f"model.restore_from_path={tmp_path}/GPT-2B.nemo",
                  expect="GPT-2B.nemo: no such file")


def test_a_checkpoint_no_reader_takes_is_refused_before_prep_runs(tmp_path):
    """A truncated download or a wrong file used to fail when the rm stage loaded it, after prep."""
    bad = tmp_path / "GPT-2B.nemo"
    bad.write_bytes(b"<html>404</html>")
    fails_cleanly(tmp_path, "stage=prep,rm", f"model.restore_from_path={bad}",
                  expect=f"model.restore_from_path={bad}: not a .nemo archive, .gguf file, or model directory")
    empty = tmp_path / "ckpt_dir"
    empty.mkdir()
    fails_cleanly(tmp_path, f"model.restore_from_path={empty}", expect="neither an extracted .nemo")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": "User: hi\\n\\nAssistant:"}\n')
    fails_cleanly(tmp_path, "stage=ppo", f"ppo.model.data.data_prefix={{train:[{prompts}],validation:[{prompts}],"
                  f"test:[{prompts}]}}", f"ppo.reward_model.restore_from_path={bad}",
                  expect=f"ppo.reward_model.restore_from_path={bad}: not a .nemo archive")


def test_stage_input_that_no_stage_produces(tmp_path):
    err = fails_cleanly(tmp_path, "stage=rm", expect="stage rm needs 'rm.model.data.data_prefix'")
    assert "run stage prep first" in err


def test_ppo_needs_a_reward_model(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": "User: hi\\n\\nAssistant:"}\n')
    fails_cleanly(tmp_path, "stage=ppo", f"ppo.model.data.data_prefix={{train:[{prompts}],validation:[{prompts}],"
                  f"test:[{prompts}]}}", expect="stage ppo needs 'ppo.reward_model.restore_from_path'")


def test_explicit_data_prefix_must_exist(tmp_path):
    fails_cleanly(tmp_path, "stage=rm", f"rm.model.data.data_prefix.train=[{tmp_path}/x_text_document]",
                  expect=f"rm.model.data.data_prefix.train: {tmp_path}/x_text_document does not exist")


def test_min_lr_above_lr_is_refused_before_prep_runs(tmp_path):
    """The quickstart's tiny model decays to min_lr 1e-4; NeMo's lr 9e-6 on it used to fail only when
    the rm stage built its scheduler, after prep had run."""
    err = fails_cleanly(tmp_path, "rm.model.optim.lr=9e-6", expect="rm.model.optim.sched.min_lr=0.0001 is above "
                        "rm.model.optim.lr=9e-06")
    assert "lower min_lr or raise lr" in err


@pytest.mark.parametrize("override, expect", [
    ("ppo.critic.optim.lr=0", "ppo.critic.optim.lr=0.0 must be > 0"),
    ("rm.model.optim.sched.name=cosine", "rm.model.optim.sched.name='cosine' is not one of"),
    ("ppo.model.optim.sched.warmup_steps=-1", "ppo.model.optim.sched.warmup_steps=-1 must be >= 0"),
])
def test_bad_optimizer_settings_name_the_key(tmp_path, override, expect):
    fails_cleanly(tmp_path, override, expect=expect)


@pytest.mark.parametrize("override, expect", [
    ("rm.trainer.rm.max_epochs=-1", "rm.trainer.rm: max_epochs=-1 and max_steps=-1 set no length"),
    ("rm.trainer.rm.max_epochs=0", "rm.trainer.rm.max_epochs=0 must be >= 1, or -1 for no limit"),
    ("ppo.trainer.ppo.max_steps=-5", "ppo.trainer.ppo.max_steps=-5 must be >= 1, or -1 for no limit"),
    ("rm.trainer.rm.save_interval=-1", "rm.trainer.rm.save_interval=-1 must be >= 0"),
    ("rm.trainer.rm.limit_val_batches=-0.5", "rm.trainer.rm.limit_val_batches=-0.5 must be >= 0"),
    ("ppo.trainer.ppo.critic_warmup_steps=-3", "ppo.trainer.ppo.critic_warmup_steps=-3 must be >= 0"),
    ("model.activation_memory_budget=1.5", "model.activation_memory_budget=1.5 must be in (0, 1]"),
])
def test_run_length_and_intervals_are_checked_before_prep_runs(tmp_path, override, expect):
    """Without the check, a run with no length failed in the rm trainer, after prep had run."""
    fails_cleanly(tmp_path, override, expect=expect)


def test_all_problems_are_reported_at_once(tmp_path):
    cfg = compose_cfg([f"run.dir={tmp_path}", "rm.model.global_batch_size=36", "data.source=hubb"])
    with pytest.raises(ConfigError) as e:
        launch(cfg)
    assert len(e.value.problems) >= 2


@pytest.mark.parametrize("sweep, expect", [
    ("rm.model.global_batch_size=32,36", "rm.model.global_batch_size=36 is not divisible"),
    ("model=tiny,gpt_2b", "missing value for 'model.restore_from_path'"),
])
def test_a_sweep_with_a_bad_point_is_refused_before_any_point_runs(tmp_path, sweep, expect):
    """hydra/sweeper=kit validates every point up front: exit 2, the bad point named, nothing run or written."""
    sweep_dir = tmp_path / "sweep"
    r = cli("-m", "stage=rm", sweep, f"run.dir={tmp_path}/run", f"hydra.sweep.dir={sweep_dir}")
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert expect in r.stderr and f"sweep point #1: {sweep.split('=')[0]}=" in r.stderr, r.stderr
    assert "sweep point #0" not in r.stderr and "Traceback" not in r.stderr + r.stdout
    assert not sweep_dir.exists() and not (tmp_path / "run").exists(), "a rejected sweep must not write anything"


@pytest.mark.parametrize("stage, packed, gbs, mbs", [
    ("sft", "sft.model.data.train_ds.packed_sequence", "sft.model.data.train_ds.global_batch_size",
     "sft.model.data.train_ds.micro_batch_size"),
    ("dpo", "dpo.model.data.packing", "dpo.model.global_batch_size", "dpo.model.micro_batch_size"),
])
def test_packed_sft_and_dpo_do_not_need_a_micro_batch_that_divides_the_global_batch(tmp_path, stage, packed, gbs,
                                                                                    mbs):
    """Packing fills micro-batches by tokens (micro_batch_size unused, as the presets say): 24 over 16 passes
    packed, is refused unpacked, and the data-parallel split is still checked."""
    from launcher.validate import _parallelism

    def problems(*extra):
        cfg = compose_cfg([f"run.dir={tmp_path}", f"{gbs}=24", f"{mbs}=16", *extra])
        return [p for p in _parallelism(cfg, ["prep", stage]) if gbs in p]
    assert problems(f"{packed}=true") == []
    assert "is not divisible by micro_batch_size=16" in " ".join(problems(f"{packed}=false"))
    assert "not divisible by the data-parallel size 5" in " ".join(
        problems(f"{packed}=true", "cluster.processes_per_node=5", "cluster.gpus_per_node=5",
                 f"{stage}.trainer.devices=5"))
