"""The one resume rule of the training stages (engine/resume.py): checkpoints are resumed only
when the same config wrote them; otherwise they are moved aside, saying which keys changed.
The stages themselves are exercised in test_rm_training.py and test_ppo_stage.py."""
from __future__ import annotations

import json
import logging
import os
import time

import pytest

from engine.resume import IDENTITY, prepare_checkpoint_dir, stage_identity
from tests.kit import compose_cfg

SECTIONS, RESUMABLE = ("model", "rm", "data.tokenizer"), ("rm.exp_manager", "rm.trainer.rm.max_steps")


def _ckpt(tmp_path, cfg, resume=True):
    """A checkpoint folder as a finished run leaves it: identity.json, index.json and a state file."""
    d = tmp_path / "checkpoints"
    prepare_checkpoint_dir(str(d), stage_identity(cfg, SECTIONS, RESUMABLE), resume, "rm")
    (d / "step=6.pt").write_bytes(b"state")
    (d / "index.json").write_text(json.dumps({"checkpoints": [{"step": 6, "path": "step=6.pt"}]}))
    return d


def _again(d, cfg, resume=True):
    return prepare_checkpoint_dir(str(d), stage_identity(cfg, SECTIONS, RESUMABLE), resume, "rm")


def test_same_config_keeps_its_checkpoints_and_resumable_keys_may_change(tmp_path):
    d = _ckpt(tmp_path, compose_cfg(["rm.trainer.rm.max_steps=6"]))
    assert _again(d, compose_cfg(["rm.trainer.rm.max_steps=12", "rm.exp_manager.name=x"])) is None
    assert (d / "step=6.pt").exists()


def test_a_changed_key_moves_the_checkpoints_aside_naming_the_key(tmp_path, caplog):
    d = _ckpt(tmp_path, compose_cfg([]))
    with caplog.at_level(logging.WARNING):
        moved = _again(d, compose_cfg(["rm.model.optim.lr=2e-5", "rm.model.global_batch_size=48"]))
    assert moved and os.path.basename(moved).startswith("checkpoints.old-")
    assert (tmp_path / os.path.basename(moved) / "step=6.pt").exists() and not (d / "step=6.pt").exists()
    assert json.loads((d / IDENTITY).read_text())["rm.model.optim.lr"] == 2e-5  # the new config is recorded
    msg = caplog.text
    assert "rm.model.optim.lr" in msg and "rm.model.global_batch_size: 32 -> 48" in msg and moved in msg


def test_resume_if_exists_false_and_unrecorded_checkpoints_are_not_resumed(tmp_path, caplog):
    cfg = compose_cfg([])
    d = _ckpt(tmp_path, cfg)
    with caplog.at_level(logging.WARNING):
        assert _again(d, cfg, resume=False)
    assert "resume_if_exists=false" in caplog.text
    (d / "step=2.pt").write_bytes(b"state from an older kit")  # no identity.json
    (d / IDENTITY).unlink()
    assert _again(d, cfg) and not (d / "step=2.pt").exists()


def test_force_trains_from_scratch_but_a_requeue_of_the_same_launch_resumes(tmp_path, caplog):
    cfg = compose_cfg([])
    d = _ckpt(tmp_path, cfg)
    forced = compose_cfg(["run.force_id=launch-1"])
    with caplog.at_level(logging.WARNING):
        assert _again(d, forced)
    assert "force=true" in caplog.text
    (d / "step=3.pt").write_bytes(b"state of launch-1")
    assert _again(d, forced) is None and (d / "step=3.pt").exists()  # the requeued job: same config.yaml
    assert _again(d, compose_cfg([])) is None  # a plain re-run may resume it: same config
    assert _again(d, compose_cfg(["run.force_id=launch-2"]))  # another force=true launch: from scratch


def test_an_input_file_rewritten_under_the_same_path_is_a_change(tmp_path, caplog):
    prefix = tmp_path / "data" / "hh_train"
    prefix.parent.mkdir()
    for ext in (".bin", ".idx"):
        (prefix.parent / f"hh_train{ext}").write_bytes(b"old")
    over = [f"rm.model.data.data_prefix={{train:[{prefix}],validation:[],test:[]}}"]
    d = _ckpt(tmp_path, compose_cfg(over))
    assert _again(d, compose_cfg(over)) is None
    time.sleep(0.01)
    (prefix.parent / "hh_train.bin").write_bytes(b"new data")  # prep ran again
    with caplog.at_level(logging.WARNING):
        assert _again(d, compose_cfg(over))
    assert "rm.model.data.data_prefix.train (files)" in caplog.text


def test_plan_gives_force_true_stages_a_launch_id(tmp_path):
    from launcher.plan import make_plan

    cfg = compose_cfg(["stage=prep", f"run.dir={tmp_path}"])
    assert make_plan(cfg, ["prep"], tmp_path, force=False, dry_run=False)[0].cfg.run.force_id is None
    a = make_plan(cfg, ["prep"], tmp_path, force=True, dry_run=False)[0].cfg.run.force_id
    assert a and str(os.getpid()) in a
