"""Learning-rate schedules worked out before anything runs: NeMo's CosineAnnealing as a closed form
(the same numbers the trainers step), each schedule's shape in the dry run, and the trap NeMo's
`constant_steps` sets on short runs (min_lr held at the END of the schedule) refused with the keys
that fit, unless `sched.allow_min_lr_hold=true`."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.schedule import shape, trap
from launcher.schedules import idx_sequences
from engine.optim import build_scheduler
from tests.kit import cli

NEMO_RM = {"name": "adamw", "lr": 9e-6,
           "sched": {"name": "CosineAnnealing", "warmup_steps": 10, "constant_steps": 1000, "min_lr": 9e-7}}


def test_closed_form_is_what_the_scheduler_steps():
    for sched in (NEMO_RM["sched"], dict(NEMO_RM["sched"], constant_steps=0), dict(NEMO_RM["sched"], constant_steps=5),
                  {"name": "constant", "warmup_steps": 3}):
        optim = dict(NEMO_RM, sched=sched)
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=optim["lr"])
        s = build_scheduler(opt, optim, 31)
        stepped = []
        for _ in range(31):
            stepped.append(opt.param_groups[0]["lr"])
            opt.step()
            s.step()
        sh = shape(optim, 31)
        assert sh.lr_start == pytest.approx(stepped[0]) and sh.lr_end == pytest.approx(stepped[-1])
        assert sh.lr_peak == pytest.approx(max(stepped))


def test_nemo_defaults_on_a_31_step_run_sit_at_min_lr():
    """The issue's case: 64 rollouts / global batch 64 = 31 PPO optimizer steps, warmup 10 + constant 1000."""
    s = shape(NEMO_RM, 31)
    assert (s.warmup, s.at_min_lr) == (10, 20)  # the first warmup step is below min_lr: warmup, not a hold
    assert s.lr_peak == pytest.approx(9e-6) and s.lr_end == pytest.approx(9e-7)
    msg = trap("rm.model.optim", NEMO_RM, 31, "31 steps")
    assert "20 of them (65%) at min_lr" in msg and "rm.model.optim.sched.constant_steps=0" in msg
    assert "rm.model.optim.sched.allow_min_lr_hold=true" in msg
    # what it proposes fits
    assert trap("rm.model.optim", dict(NEMO_RM, sched=dict(NEMO_RM["sched"], constant_steps=0)), 31, "") is None
    assert trap("k", dict(NEMO_RM, sched=dict(NEMO_RM["sched"], constant_steps=31 // 4)), 31, "") is None
    # the same keys on the full HH run (2,512 steps) are fine: NeMo's semantics are not changed
    assert trap("rm.model.optim", NEMO_RM, 2512, "") is None
    assert trap("k", dict(NEMO_RM, sched=dict(NEMO_RM["sched"], allow_min_lr_hold=True)), 31, "") is None


def test_launcher_refuses_a_trapped_rm_schedule_naming_the_keys(tmp_path):
    run = tmp_path / "run"
    r = cli("stage=prep,rm", f"run.dir={run}", "rm.model.optim.sched.warmup_steps=5",
            "rm.model.optim.sched.constant_steps=1000")
    assert r.returncode == 2, r.stdout + r.stderr
    # the quickstart: 640 sample pairs / global batch 32 = 20 optimizer steps, 5 of warmup, then min_lr
    assert "rm.model.optim.sched: this run has 20 optimizer steps" in r.stderr
    assert "640 pairs / global_batch_size 32" in r.stderr and "constant_steps=0" in r.stderr
    assert "Traceback" not in r.stderr and not run.exists()  # nothing ran, nothing written
    ok = cli("stage=prep,rm", f"run.dir={run}", "rm.model.optim.sched.warmup_steps=5", "dry_run=true",
             "rm.model.optim.sched.constant_steps=1000", "rm.model.optim.sched.allow_min_lr_hold=true")
    assert ok.returncode == 0, ok.stderr
    assert "rm.model.optim: CosineAnnealing over 20 optimizer steps: warmup 5, decay 1, at min_lr 14 (70%)" in ok.stdout


def test_launcher_refuses_trapped_ppo_schedules_and_prints_each_shape(tmp_path):
    r = cli("stage=ppo", f"run.dir={tmp_path}/r", "ppo.reward_model.restore_from_path=/nonexistent.nemo",
            "ppo.model.optim.sched.constant_steps=1000", "ppo.model.optim.sched.min_lr=3e-4",
            "ppo.model.optim.sched.warmup_steps=4", "ppo.model.data.data_prefix={train:[" + str(_prompts(tmp_path)) + "]}")
    assert r.returncode == 2
    assert "ppo.model.optim.sched: this run has 64 optimizer steps (max_steps 16 x ppo_epochs 4 x 32 rollouts" in r.stderr
    assert "ppo.critic.optim.sched" not in r.stderr  # the quickstart critic's schedule fits
    dry = cli("stage=rm,ppo", f"run.dir={tmp_path}/d", "dry_run=true")
    assert dry.returncode == 0, dry.stderr
    for key in ("rm.model.optim", "ppo.model.optim", "ppo.critic.optim"):
        line = next(x for x in dry.stdout.splitlines() if x.startswith(f"#   {key}: "))
        for word in ("warmup", "decay", "at min_lr", "lr start", "peak", "end"):
            assert word in line, line


def _prompts(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join('{"text": "User: hi %d\\n\\nAssistant:"}\n' % i for i in range(100)))
    return p


def test_run_length_is_counted_from_the_data_prefix(tmp_path):
    from data_prep.indexed import MMapIndexedWriter

    w = MMapIndexedWriter(str(tmp_path / "d"), np.uint16)
    for i in range(14):
        w.add_document([1, 2, 3][: 1 + i % 3])
    w.finish()
    assert idx_sequences(str(tmp_path / "d")) == 14  # 7 pairs


def test_the_stage_refuses_a_trap_it_finds_at_run_time():
    """Hub data cannot be counted before prep; the stage applies the same rule with the real count."""
    from rm_training.config import RMConfig, SchedConfig
    from rm_training.stage import _check_schedule

    rm = RMConfig()
    with pytest.raises(ValueError, match="rm.model.optim.sched: this run has 31 optimizer steps"):
        _check_schedule(rm, 31 * 64)
    rm.model.optim.sched = SchedConfig(constant_steps=0)
    _check_schedule(rm, 31 * 64)
