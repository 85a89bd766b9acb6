"""PPO with the critic-free advantage estimators (ppo.model.ppo.advantage_estimator: grpo | rloo) on CPU:
the prep stage's prompts, the toy reward model of known preference (ppo/toy.py), the tiny policy.

- through the launcher, GRPO raises the held-out reward with no critic loaded, trained or checkpointed
- RLOO: preemption -> checkpoint + exit 75 -> resume == the uninterrupted run, exactly
- the keys' rules are refused naming the key
"""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from tests.kit import cli, compose_cfg
from tests.test_ppo_stage import QUICK, prepped, rows  # noqa: F401 (prepped: the module fixture)

# the quickstart's PPO sizes (32 responses of <= 48 tokens a step, as the GAE test), 8 prompts x 4 responses
CRITIC_FREE = ["ppo.model.ppo.num_rollouts_per_prompt=4", "ppo.model.ppo.num_rollout_samples=32"]


def test_grpo_through_the_launcher_reward_rises_without_a_critic(prepped):  # noqa: F811
    run, _, rm = prepped
    r = cli("stage=ppo", f"run.dir={run}", f"ppo.reward_model.restore_from_path={rm}", *QUICK, *CRITIC_FREE,
            "ppo.model.ppo.advantage_estimator=grpo", "ppo.trainer.ppo.max_steps=8",
            # the toy reward moves by a few hundredths within a group: a KL term of that size would hide it
            "ppo.trainer.ppo.initial_policy_kl_penalty=0.0",
            "ppo.trainer.ppo.val_check_interval=4", "ppo.trainer.ppo.save_interval=4", "ppo.exp_manager.name=grpo")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    arts = json.loads((run / "manifest.json").read_text())["stages"]["ppo"]["artifacts"]
    val, train = rows(arts["metrics"], "val"), rows(arts["metrics"], "train")
    assert [v["step"] for v in val] == [0, 4, 8] and len(train) == 8
    assert val[-1]["val_reward_mean"] > val[0]["val_reward_mean"] + 0.02, val
    assert all(t["value_loss"] is None for t in train)  # nan (written as null): no critic trained
    assert "no critic (grpo, 4 responses per prompt)" in (run / "ppo" / "log.txt").read_text()
    index = json.loads((run / "ppo" / "checkpoints" / "index.json").read_text())["checkpoints"]
    state = torch.load(run / "ppo" / "checkpoints" / index[-1]["path"], weights_only=True)
    assert state["critic"] == {} and state["actor"]["master"]  # nothing of a critic is kept


def _cfg(run: Path, arts, rm, name: str, extra=()):
    return compose_cfg([
        f"run.dir={run}", f"ppo.exp_manager.explicit_log_dir={run / name}", f"data.tokenizer.model={arts['tokenizer']}",
        f"ppo.reward_model.restore_from_path={rm}",
        f"ppo.model.data.data_prefix={{train:[{arts['prompts']['train']}],validation:[{arts['prompts']['test']}]}}",
        *QUICK, "ppo.model.ppo.num_rollout_samples=8", "ppo.model.ppo.num_rollouts_per_prompt=2",
        "ppo.model.ppo.rollout_micro_batch_size=8", "ppo.model.ppo.length_params.max_length=12",
        "ppo.model.ppo.num_val_samples=8", "ppo.model.global_batch_size=4", "ppo.model.micro_batch_size=2",
        "ppo.trainer.ppo.max_steps=4",
        "ppo.trainer.ppo.val_check_interval=2", "ppo.trainer.ppo.save_interval=10",
        "ppo.model.ppo.advantage_estimator=rloo", *extra])


def test_rloo_preemption_resumes_exactly(prepped, monkeypatch):  # noqa: F811
    import ppo
    from ppo.trainer import PPOTrainer

    run, arts, rm = prepped
    straight = ppo.run(_cfg(run, arts, rm, "rloo_straight"))
    original = PPOTrainer.train_step

    def step_then_signal(self):
        out = original(self)
        if self.step == 2:
            signal.raise_signal(signal.SIGUSR1)
        return out

    monkeypatch.setattr(PPOTrainer, "train_step", step_then_signal)
    with pytest.raises(SystemExit) as e:
        ppo.run(_cfg(run, arts, rm, "rloo_cut"))
    assert e.value.code == 75
    monkeypatch.setattr(PPOTrainer, "train_step", original)
    resumed = ppo.run(_cfg(run, arts, rm, "rloo_cut"))
    drop = ("time", "time_generation", "time_scoring", "time_training", "time_step", "generation_tokens_per_s")
    clean = lambda rs: [{k: v for k, v in r.items() if k not in drop} for r in rs]  # noqa: E731
    a, b = clean(rows(straight["metrics"], "train")), clean(rows(resumed["metrics"], "train"))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert json.dumps(a) == json.dumps(b)  # nan-safe equality (value_loss is nan: no critic)
    assert clean(rows(straight["metrics"], "val")) == clean(rows(resumed["metrics"], "val"))


@pytest.mark.parametrize("extra, message", [
    (["ppo.model.ppo.num_rollouts_per_prompt=1"], r"num_rollouts_per_prompt=1: rloo needs at least 2"),
    (["ppo.model.ppo.num_rollouts_per_prompt=3"], r"num_rollout_samples=8 is not divisible by num_rollouts_per_prompt=3"),
    (["ppo.model.ppo.advantage_estimator=vtrace"], r"advantage_estimator='vtrace': expected one of gae \| grpo \| rloo"),
])
def test_estimator_keys_are_refused_by_name(prepped, extra, message):  # noqa: F811
    import ppo

    run, arts, rm = prepped
    with pytest.raises(ValueError, match=message):
        ppo.run(_cfg(run, arts, rm, "bad", extra))
