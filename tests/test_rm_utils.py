"""Unit tests of the generic training utilities in engine/ (optim, checkpointing, metrics,
distributed, progress) that the rm and ppo stages share."""
from __future__ import annotations

import json
import math
import os
import random
import signal

import numpy as np
import pytest
import torch

from engine import checkpointing, distributed, metrics, optim


def _nemo_lr(step, base, warmup, constant, max_steps, min_lr):
    """NeMo's CosineAnnealing written out from its source (WarmupAnnealHoldPolicy.get_lr)."""
    decay = max_steps - (constant + warmup)
    if warmup > 0 and step <= warmup:
        return base * (step + 1) / (warmup + 1)
    if constant > 0 and warmup + decay < step <= max_steps:
        return min_lr
    if step > max_steps:
        return min_lr
    if constant == 0:
        return (base - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (max_steps - warmup))) + min_lr
    ratio = (step - warmup) / decay
    return min_lr + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (base - min_lr)


@pytest.mark.parametrize("warmup,constant", [(10, 0), (10, 30), (0, 0), (5, 20)])
def test_cosine_annealing_matches_nemo(warmup, constant):
    model = torch.nn.Linear(4, 4)
    cfg = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.98],
           "sched": {"name": "CosineAnnealing", "warmup_steps": warmup, "constant_steps": constant, "min_lr": 1e-4}}
    opt = optim.build_optimizer(model, cfg)
    sched = optim.build_scheduler(opt, cfg, max_steps=100)
    for step in range(110):
        assert opt.param_groups[0]["lr"] == pytest.approx(_nemo_lr(step, 1e-3, warmup, constant, 100, 1e-4), rel=1e-9)
        opt.step()
        sched.step()
    # a fresh scheduler loaded from the state dict continues at the same lr
    opt2 = optim.build_optimizer(model, cfg)
    s2 = optim.build_scheduler(opt2, cfg, max_steps=100)
    s2.load_state_dict(sched.state_dict())
    s2.step()
    sched.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


def test_weight_decay_groups():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    opt = optim.build_optimizer(model, {"lr": 1e-3, "weight_decay": 0.1})
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {tuple(p.shape) for p in decay["params"]} == {(10, 4), (2, 4)}
    assert all(p.ndim == 1 for p in no_decay["params"])


def test_checkpoint_manager_keeps_last_and_top_k(tmp_path):
    removed = []
    mgr = checkpointing.CheckpointManager(str(tmp_path), monitor="val_loss", mode="min", save_top_k=2,
                                          filename="megatron_gpt--{val_loss:.3f}-{step}", on_remove=removed.append)
    for step, loss in [(1, 0.9), (2, 0.5), (3, 0.7), (4, 0.6), (5, 0.95)]:
        mgr.save({"step": step}, step, {"val_loss": loss})
    kept = sorted(e["step"] for e in mgr.entries)
    assert kept == [2, 4, 5]  # top-2 (0.5, 0.6) + the newest
    assert os.path.basename(mgr.latest()) == "megatron_gpt--val_loss=0.950-step=5.pt"
    assert len(removed) == 2 and not any(os.path.exists(p) for p in removed)
    # a new manager reads the index back; load_state restores RNG
    again = checkpointing.CheckpointManager(str(tmp_path), monitor="val_loss", save_top_k=2,
                                            filename="megatron_gpt--{val_loss:.3f}-{step}")
    assert again.latest() == mgr.latest() and again.best()["step"] == 2
    assert json.loads((tmp_path / "index.json").read_text())["monitor"] == "val_loss"


def test_rng_roundtrip(tmp_path):
    checkpointing.seed_everything(3)
    p = checkpointing.save_state(str(tmp_path / "s.pt"), {"x": 1})
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    state = checkpointing.load_state(p)
    assert state["x"] == 1
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_preemption_handler_catches_and_restores():
    before = signal.getsignal(signal.SIGUSR1)
    with checkpointing.PreemptionHandler() as h:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert h.requested == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == before


def test_metrics_logger_jsonl_tb_plot_and_resume(tmp_path):
    log = metrics.MetricsLogger(str(tmp_path), enabled=True)
    for s in range(1, 6):
        log.log(s, {"loss": 1.0 / s, "accuracy": 0.5 + s / 20}, "train")
    log.log(5, {"loss": 0.3, "accuracy": 0.8}, "val")
    png = log.plot(["loss", "accuracy"])
    log.close()
    assert os.path.getsize(png) > 1000
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    resumed = metrics.MetricsLogger(str(tmp_path), enabled=True, resume_step=3)
    assert [r["step"] for r in resumed.rows("train")] == [1, 2, 3] and resumed.rows("val") == []
    resumed.close()


def test_distributed_single_process_defaults():
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.all_reduce_mean({"a": 2.0}) == {"a": 2.0}
    assert distributed.select_device("cpu").type == "cpu"
