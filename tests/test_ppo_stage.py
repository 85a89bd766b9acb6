"""The ppo stage for real on CPU: the prep stage's prompts and tokenizer, a reward model with a known
preference (ppo/toy.py, saved as a .nemo like the rm stage's), the tiny random-init policy.

- through the launcher: validation reward rises while KL stays bounded; the .nemo loads with its tokenizer
- preemption (SIGUSR1 mid-run) -> checkpoint + exit 75 -> resume == the uninterrupted run, exactly
"""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from tests.kit import cli, compose_cfg

QUICK = [  # fast, strong-signal settings for the tiny policy
    "ppo.model.ppo.ppo_epochs=4", "ppo.model.optim.lr=3e-3", "ppo.model.optim.sched.warmup_steps=0",
    "ppo.model.optim.sched.constant_steps=0", "ppo.model.optim.sched.min_lr=3e-3",
    "ppo.critic.optim.sched.warmup_steps=0", "ppo.critic.optim.sched.constant_steps=0",
    "ppo.critic.optim.sched.min_lr=1e-4",
]


@pytest.fixture(scope="module")
def prepped(tmp_path_factory):
    run = tmp_path_factory.mktemp("ppo_run")
    r = cli("stage=prep", f"run.dir={run}")
    assert r.returncode == 0, r.stdout + r.stderr
    arts = json.loads((run / "manifest.json").read_text())["stages"]["prep"]["artifacts"]
    from data_prep.tokenizers import load_tokenizer
    from ppo.toy import save_token_class_reward_model

    tok = load_tokenizer(arts["tokenizer"])
    rm = save_token_class_reward_model(str(run / "toy_rm.nemo"), arts["tokenizer"], tok.vocab_size)
    return run, arts, rm


def rows(path, split):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if json.loads(x)["split"] == split]


def test_ppo_stage_through_launcher_reward_rises_kl_bounded(prepped):
    run, _, rm = prepped
    r = cli("stage=ppo", f"run.dir={run}", f"ppo.reward_model.restore_from_path={rm}", *QUICK,
            "ppo.trainer.ppo.max_steps=8", "ppo.trainer.ppo.val_check_interval=4", "ppo.trainer.ppo.save_interval=4")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    entry = json.loads((run / "manifest.json").read_text())["stages"]["ppo"]
    arts = entry["artifacts"]
    assert entry["status"] == "succeeded" and Path(arts["nemo"]).exists() and Path(arts["plot"]).exists()
    val = rows(arts["metrics"], "val")
    train = rows(arts["metrics"], "train")
    assert [v["step"] for v in val] == [0, 4, 8] and len(train) == 8
    assert val[-1]["val_reward_mean"] > val[0]["val_reward_mean"] + 0.02, val
    assert all(abs(t["kl"]) < 60 for t in train), [t["kl"] for t in train]  # nats per 48-token response
    for key in ("reward_std", "entropy", "clip_fraction", "value_loss", "explained_variance", "response_length",
                "time_generation", "time_scoring", "time_training"):
        assert key in train[-1]
    assert list((run / "ppo" / "samples").glob("step_*.jsonl"))
    assert list((run / "ppo" / "tensorboard").iterdir())

    from data_prep.tokenizers import load_tokenizer
    from modeling import load_pretrained

    actor = load_pretrained(arts["nemo"])
    tok = load_tokenizer(arts["nemo"], "nemo", extract_dir=str(run / "tok_from_nemo"))
    assert tok.vocab_size <= actor.vocab_size and actor.language_model.output_layer is not None


def _cfg(run: Path, arts, rm, name: str, extra=()):
    return compose_cfg([
        f"run.dir={run}", f"ppo.exp_manager.explicit_log_dir={run / name}", f"data.tokenizer.model={arts['tokenizer']}",
        f"ppo.reward_model.restore_from_path={rm}",
        f"ppo.model.data.data_prefix={{train:[{arts['prompts']['train']}],validation:[{arts['prompts']['test']}]}}",
        "ppo.model.ppo.num_rollout_samples=8", "ppo.model.ppo.rollout_micro_batch_size=8",
        "ppo.model.ppo.num_val_samples=8", "ppo.model.ppo.length_params.max_length=12",
        "ppo.model.global_batch_size=4", "ppo.model.micro_batch_size=2", "ppo.critic.global_batch_size=8",
        "ppo.critic.micro_batch_size=4", "ppo.trainer.ppo.max_steps=4", "ppo.trainer.ppo.val_check_interval=2",
        "ppo.trainer.ppo.save_interval=10", "ppo.model.ppo.entropy_bonus=0.01", *QUICK, *extra])


def test_preemption_checkpoints_exits_75_and_resumes_exactly(prepped, monkeypatch):
    import ppo
    from modeling import load_pretrained
    from ppo.trainer import PPOTrainer

    run, arts, rm = prepped
    straight = ppo.run(_cfg(run, arts, rm, "straight"))

    original = PPOTrainer.train_step

    def step_then_signal(self):
        out = original(self)
        if self.step == 2:
            signal.raise_signal(signal.SIGUSR1)  # what Slurm sends before the time limit
        return out

    monkeypatch.setattr(PPOTrainer, "train_step", step_then_signal)
    with pytest.raises(SystemExit) as e:
        ppo.run(_cfg(run, arts, rm, "resumed"))
    assert e.value.code == 75
    assert [r["step"] for r in rows(run / "resumed" / "metrics.jsonl", "train")] == [1, 2]
    monkeypatch.setattr(PPOTrainer, "train_step", original)
    resumed = ppo.run(_cfg(run, arts, rm, "resumed"))

    a, b = load_pretrained(straight["nemo"]).state_dict(), load_pretrained(resumed["nemo"]).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = ("time", "time_generation", "time_scoring", "time_training", "time_step", "generation_tokens_per_s")
    clean = lambda rs: [{k: v for k, v in r.items() if k not in drop} for r in rs]  # noqa: E731
    assert clean(rows(straight["metrics"], "train")) == clean(rows(resumed["metrics"], "train"))
    assert clean(rows(straight["metrics"], "val")) == clean(rows(resumed["metrics"], "val"))


def test_two_process_data_parallel_ranks_stay_identical(prepped):
    """cluster.processes_per_node=2 on the CPU: gloo, each rank generates half the rollouts."""
    run, _, rm = prepped
    r = cli("stage=ppo", f"run.dir={run}", f"ppo.reward_model.restore_from_path={rm}", "cluster.processes_per_node=2",
            "ppo.trainer.ppo.max_steps=2", "ppo.trainer.ppo.val_check_interval=0", "ppo.trainer.ppo.critic_warmup_steps=1",
            "ppo.model.ppo.length_params.max_length=8", "ppo.exp_manager.explicit_log_dir=" + str(run / "ppo_ddp"),
            "ppo.model.torch_profile.enabled=true", "ppo.model.torch_profile.start_step=2",
            "ppo.model.torch_profile.end_step=2", "ppo.model.torch_profile.ranks=[0,1]", *QUICK)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for rank in (0, 1):  # a trace of step 2 from each rank
        assert (run / "ppo_ddp" / "profile" / f"rank{rank}_steps2-2.json").stat().st_size > 0
    sums = []
    for name in ("log.txt", "log_rank1.txt"):
        line = [x for x in (run / "ppo" / name).read_text().splitlines() if "actor checksum" in x][-1]
        sums.append(line.split("checksum")[-1].strip())
    assert sums[0] == sums[1]
    train = rows(run / "ppo_ddp" / "metrics.jsonl", "train")
    assert len(train) == 2
    # critic_warmup_steps=1: step 1 trains only the critic, step 2 both
    assert "actor_optimizer_steps" not in train[0] and train[0]["critic_optimizer_steps"] == 4
    assert train[1]["actor_optimizer_steps"] == 4


# what the report proposes for conf/experiment/quickstart.yaml's ppo block (lr 1e-4 under NeMo's
# 10-step warmup barely moves a random-init policy in 8 steps)
QUICKSTART_PPO = [
    "ppo.trainer.ppo.max_steps=16", "ppo.trainer.ppo.val_check_interval=8", "ppo.trainer.ppo.save_interval=8",
    "ppo.model.ppo.ppo_epochs=4", "ppo.model.optim.lr=3e-3", "ppo.model.optim.sched.warmup_steps=0",
    "ppo.model.optim.sched.constant_steps=0", "ppo.model.optim.sched.min_lr=3e-3",
    "ppo.critic.optim.sched.warmup_steps=0", "ppo.critic.optim.sched.constant_steps=0",
    "ppo.critic.optim.sched.min_lr=1e-4",
]


def test_whole_quickstart_prep_rm_ppo_reward_rises(tmp_path):
    """python launcher/main.py: prep -> rm (the real tiny reward model) -> ppo, on the embedded sample."""
    r = cli(f"run.dir={tmp_path}", *QUICKSTART_PPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    stages = json.loads((tmp_path / "manifest.json").read_text())["stages"]
    assert [stages[s]["status"] for s in ("prep", "rm", "ppo")] == ["succeeded"] * 3
    arts = stages["ppo"]["artifacts"]
    val = rows(arts["metrics"], "val")
    assert [v["step"] for v in val] == [0, 8, 16]
    assert val[-1]["val_reward_mean"] > val[0]["val_reward_mean"] + 0.1, val
    from modeling import load_pretrained

    assert load_pretrained(arts["nemo"]).vocab_size >= 1
