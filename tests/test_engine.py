"""engine/: the rules every training stage shares, each tested against every stage (rm and ppo, the
tiny CPU model on the embedded sample), plus the engine's own pieces.

- run length: whichever of max_steps and max_epochs comes first (NeMo/PTL), and the log says which
- preemption: a signal checkpoints at the next step boundary, before a due validation, or cuts a
  running validation short; exit 75; the resumed run equals the uninterrupted one
- resume: a checkpoint is read with weights_only=True (a crafted pickle in index.json runs nothing);
  a checkpoint whose config digest is not this config's is not resumed
- outputs: the .nemo files get the umask's permissions like every other output
"""
from __future__ import annotations

import ast
import dataclasses
import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch

from tests.kit import CONF, ROOT, cli, compose_cfg

TINY = ["model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4", "model.num_layers=2"]
PPO_QUICK = ["ppo.model.ppo.ppo_epochs=2", "ppo.model.optim.lr=3e-3", "ppo.model.optim.sched.warmup_steps=0",
             "ppo.model.optim.sched.constant_steps=0", "ppo.model.optim.sched.min_lr=3e-3",
             "ppo.critic.optim.sched.warmup_steps=0", "ppo.critic.optim.sched.constant_steps=0",
             "ppo.critic.optim.sched.min_lr=1e-4"]
DROP = ("time", "time_generation", "time_scoring", "time_training", "time_step", "generation_tokens_per_s",
        "pairs_per_s", "tokens_per_s", "step_time")


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    """The prep stage's artifacts (real sample data and tokenizer) and a toy reward model for ppo."""
    run = tmp_path_factory.mktemp("engine")
    r = cli("stage=prep", f"run.dir={run}")
    assert r.returncode == 0, r.stdout + r.stderr
    arts = json.loads((run / "manifest.json").read_text())["stages"]["prep"]["artifacts"]
    from data_prep.tokenizers import load_tokenizer
    from ppo.toy import save_token_class_reward_model

    tok = load_tokenizer(arts["tokenizer"])
    arts["toy_rm"] = save_token_class_reward_model(str(run / "toy_rm.nemo"), arts["tokenizer"], tok.vocab_size)
    return arts


def _rm_cfg(arts, stage_dir, *extra, train=None):
    prefixes = dict(arts["data_prefix"], **({"train": train} if train else {}))
    cfg = compose_cfg(["stage=rm", *TINY, "rm.trainer.rm.max_steps=4", "rm.trainer.rm.val_check_interval=2",
                       "rm.trainer.rm.save_interval=10", "rm.model.global_batch_size=16", "rm.model.micro_batch_size=4",
                       "rm.trainer.rm.limit_val_batches=2", "rm.model.optim.sched.warmup_steps=0",
                       "rm.model.optim.sched.constant_steps=0", "rm.model.optim.sched.min_lr=1e-6",
                       "rm.exp_manager.checkpoint_callback_params.always_save_nemo=false", *extra])
    cfg.run.stage_dir = str(stage_dir)
    cfg.rm.exp_manager.explicit_log_dir = str(stage_dir)
    cfg.data.tokenizer.model = arts["tokenizer"]
    from omegaconf import OmegaConf

    OmegaConf.update(cfg, "rm.model.data.data_prefix", {k: [v] for k, v in prefixes.items()}, merge=False)
    return cfg


def _ppo_cfg(arts, stage_dir, *extra, train=None):
    return compose_cfg([
        "stage=ppo", f"run.dir={Path(stage_dir).parent}", f"ppo.exp_manager.explicit_log_dir={stage_dir}",
        f"data.tokenizer.model={arts['tokenizer']}", f"ppo.reward_model.restore_from_path={arts['toy_rm']}",
        f"ppo.model.data.data_prefix={{train:[{train or arts['prompts']['train']}],validation:[{arts['prompts']['test']}]}}",
        "ppo.model.ppo.num_rollout_samples=8", "ppo.model.ppo.rollout_micro_batch_size=8",
        "ppo.model.ppo.num_val_samples=8", "ppo.model.ppo.length_params.max_length=8",
        "ppo.model.global_batch_size=4", "ppo.model.micro_batch_size=2", "ppo.critic.global_batch_size=8",
        "ppo.critic.micro_batch_size=4", "ppo.trainer.ppo.max_steps=4", "ppo.trainer.ppo.val_check_interval=2",
        "ppo.trainer.ppo.save_interval=10", *PPO_QUICK, *extra])


def _stage(name):
    """(config builder, run, trainer keys, task class) of a stage."""
    if name == "rm":
        import rm_training
        from rm_training.trainer import RMTrainer

        return _rm_cfg, rm_training.run, "rm.trainer.rm", RMTrainer
    import ppo
    from ppo.stage import PPOTask

    return _ppo_cfg, ppo.run, "ppo.trainer.ppo", PPOTask


def _rows(stage_dir, split):
    rows = [json.loads(x) for x in (Path(stage_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in DROP} for r in rows if r["split"] == split]


STAGES = ["rm", "ppo"]


# --- run length --------------------------------------------------------------------------------

def test_run_length_rule():
    from engine.loop import run_length

    assert run_length(-1, 2, 10, "x") == 20 and run_length(5, 2, 10, "x") == 5 and run_length(50, 2, 10, "x") == 20
    assert run_length(7, -1, 10, "x") == 7 and run_length(7, None, 10, "x") == 7
    with pytest.raises(ValueError, match="x.max_epochs=-1 and x.max_steps=-1"):
        run_length(-1, -1, 10, "x")


@pytest.mark.parametrize("stage", STAGES)
def test_whichever_of_max_steps_and_max_epochs_comes_first(stage, prep, tmp_path, caplog):
    """ppo let max_steps win over max_epochs; every stage now stops at whichever comes first (NeMo/PTL)."""
    make, run, where, _ = _stage(stage)
    if stage == "rm":  # 32 pairs: 2 steps of 16 per epoch
        import numpy as np

        from tests.test_rm_packing import write_pairs

        lengths = [(int(a), int(b)) for a, b in np.random.default_rng(0).integers(3, 20, (32, 2))]
        small = write_pairs(tmp_path / "small", lengths)
    else:  # 16 prompts: 2 PPO steps of 8 per epoch
        lines = Path(prep["prompts"]["train"]).read_text().splitlines()[:16]
        small = tmp_path / "small_prompts.jsonl"
        small.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.INFO):
        run(make(prep, tmp_path / "epochs", f"{where}.max_steps=5", f"{where}.max_epochs=1", train=str(small)))
    assert [r["step"] for r in _rows(tmp_path / "epochs", "train")] == [1, 2]
    assert f"{where}.max_epochs=1 (x 2 steps per epoch) caps the run: 2 steps, not max_steps=5" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run(make(prep, tmp_path / "steps", f"{where}.max_steps=3", f"{where}.max_epochs=1"))
    assert [r["step"] for r in _rows(tmp_path / "steps", "train")] == [1, 2, 3]
    assert f"{where}.max_steps=3 caps the run: 3 steps" in caplog.text


# --- preemption and exact resume ------------------------------------------------------------------

@pytest.fixture(scope="module")
def straight(prep, tmp_path_factory):
    """Each stage run uninterrupted (4 steps, validation at 2 and 4): what a resumed run must equal."""
    out = {}
    for stage in STAGES:
        d = tmp_path_factory.mktemp(f"straight_{stage}") / stage
        make, run, _, _ = _stage(stage)
        run(make(prep, d))
        out[stage] = d
    return out


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("when", ["train_step", "validation"])
def test_signal_checkpoints_at_the_step_boundary_and_resumes_exactly(stage, when, prep, straight, tmp_path,
                                                                       monkeypatch, caplog):
    """Issue 18 #12: the checkpoint must fit in Slurm's grace period. A SIGUSR1 during step 2 (whose
    validation is due) saves step 2 before validating; one during that validation cuts it short.
    Either way: exit 75, and the resumed run validates step 2 first and ends equal to the straight run."""
    make, run, _, task = _stage(stage)
    real_step, real_val = task.train_step, task.validate
    calls = {"steps": 0, "sent": False}

    def step(self, i):
        out = real_step(self, i)
        calls["steps"] += 1
        if when == "train_step" and calls["steps"] == 2 and not calls["sent"]:
            calls["sent"] = True
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    def validate(self, should_stop=None):
        if when == "validation" and calls["steps"] == 2 and not calls["sent"]:
            calls["sent"] = True
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_val(self, should_stop)

    monkeypatch.setattr(task, "train_step", step)
    monkeypatch.setattr(task, "validate", validate)
    d = tmp_path / stage
    with caplog.at_level(logging.WARNING), pytest.raises(SystemExit) as exc:
        run(make(prep, d))
    assert exc.value.code == 75
    assert "its validation runs after the resume" in caplog.text
    index = json.loads((d / "checkpoints" / "index.json").read_text())["checkpoints"]
    assert max(c["step"] for c in index) == 2
    assert 2 not in [r["step"] for r in _rows(d, "val")]  # not validated before the checkpoint
    monkeypatch.setattr(task, "train_step", real_step)
    monkeypatch.setattr(task, "validate", real_val)
    run(make(prep, d))
    assert _rows(d, "train") == _rows(straight[stage], "train")
    assert _rows(d, "val") == _rows(straight[stage], "val")


# --- resume safety -----------------------------------------------------------------------------------

class _WritesAMarker:
    """Unpickling this calls open(marker, "w"): what a crafted checkpoint would do with os.system."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("stage", STAGES)
def test_a_crafted_checkpoint_runs_no_code_on_resume(stage, prep, tmp_path):
    """Issue 18 #4: resume used torch.load(weights_only=False): a .pt named in index.json ran code."""
    from engine.checkpointing import UnsafeCheckpointError

    make, run, where, _ = _stage(stage)
    d = tmp_path / stage
    run(make(prep, d, f"{where}.max_steps=2"))
    index = json.loads((d / "checkpoints" / "index.json").read_text())["checkpoints"]
    latest = d / "checkpoints" / max(index, key=lambda e: e["step"])["path"]
    marker = tmp_path / "pwned"
    torch.save({"step": 2, "payload": _WritesAMarker(str(marker))}, latest)
    assert torch.load(latest, weights_only=False) and marker.exists()  # the file does run code when trusted
    marker.unlink()
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        run(make(prep, d, f"{where}.max_steps=3"))
    assert not marker.exists()


@pytest.mark.parametrize("stage", STAGES)
def test_a_checkpoint_of_another_config_is_not_resumed_and_outputs_are_umask_mode(stage, prep, tmp_path, caplog):
    """The config digest inside each checkpoint is checked (a .pt copied in from another run's folder);
    .nemo files come out 0644 under umask 022 like the metrics (they were 0600)."""
    make, run, where, _ = _stage(stage)
    old = os.umask(0o022)
    try:
        other, d = tmp_path / "other", tmp_path / stage
        run(make(prep, other, f"{where}.max_steps=2", f"{where}.gradient_clip_val=0.5"))
        out = run(make(prep, d, f"{where}.max_steps=2"))
        for path in (out["nemo"], out["metrics"]):
            assert os.stat(path).st_mode & 0o777 == 0o644, path
    finally:
        os.umask(old)
    index = json.loads((d / "checkpoints" / "index.json").read_text())["checkpoints"]
    name = max(index, key=lambda e: e["step"])["path"]
    foreign = json.loads((other / "checkpoints" / "index.json").read_text())["checkpoints"]
    (other / "checkpoints" / max(foreign, key=lambda e: e["step"])["path"]).replace(d / "checkpoints" / name)
    with caplog.at_level(logging.INFO):
        run(make(prep, d, f"{where}.max_steps=3"))
    assert "holds config digest" in caplog.text and "resumed from" not in caplog.text
    assert [r["step"] for r in _rows(d, "train")] == [1, 2, 3]


def test_save_top_k_minus_one_keeps_every_checkpoint(tmp_path):
    """NeMo's meaning: -1 keeps all, ranked or not (checkpoints without a metric were pruned)."""
    from engine.checkpointing import CheckpointManager

    mgr = CheckpointManager(str(tmp_path), monitor="val_loss", save_top_k=-1, filename="c-{step}")
    for step, metrics in [(1, {}), (2, {"val_loss": 0.5}), (3, {}), (4, {"val_loss": 0.7})]:
        mgr.save({"step": step}, step, metrics)
    assert sorted(e["step"] for e in mgr.entries) == [1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["c-step=1.pt", "c-step=2.pt", "c-step=3.pt", "c-step=4.pt"]


def test_checkpoints_hold_only_plain_values_and_restore_the_rng(tmp_path):
    import random

    import numpy as np

    from engine.checkpointing import load_state, save_state, seed_everything

    seed_everything(5)
    save_state(str(tmp_path / "s.pt"), {"x": torch.ones(2)})
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    torch.load(tmp_path / "s.pt", weights_only=True)  # no allow-list needed for what the kit writes
    load_state(str(tmp_path / "s.pt"))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a


# --- one config surface ----------------------------------------------------------------------------

def _yaml_vs_dataclass(node, obj, prefix, out):
    for k, v in node.items():
        key = f"{prefix}.{k}"
        if isinstance(obj, dict):
            continue  # a free-form dict (data_prefix)
        if not hasattr(obj, k):
            out.append(f"{key}: not a field of {type(obj).__name__}")
            continue
        default = getattr(obj, k)
        if isinstance(v, dict) and dataclasses.is_dataclass(default):
            _yaml_vs_dataclass(v, default, key, out)
        elif not (isinstance(v, str) and "${" in v) and v != default:
            out.append(f"{key}: YAML {v!r}, dataclass {default!r}")


@pytest.mark.parametrize("path, schema", [("rm/training_rm.yaml", "rm_training.config:RMConfig"),
                                          ("ppo/gpt_ppo.yaml", "ppo.config:PPOConfig")])
def test_shipped_yaml_and_dataclass_defaults_agree(path, schema):
    """Defaults live in the dataclasses; the shipped YAML (NeMo's key files) must say the same."""
    import importlib

    from omegaconf import OmegaConf

    module, name = schema.split(":")
    cls = getattr(importlib.import_module(module), name)
    out = []
    _yaml_vs_dataclass(OmegaConf.to_container(OmegaConf.load(CONF / path), resolve=False), cls(), path, out)
    assert out == []


def test_optimizer_takes_every_adamw_key_from_the_dataclass():
    from engine.config import OptimConfig
    from engine.optim import build_optimizer

    opt = build_optimizer(torch.nn.Linear(3, 3), {"lr": 2e-4, "eps": 1e-6, "betas": [0.8, 0.9], "weight_decay": 0.2})
    g = opt.param_groups[0]
    assert (g["lr"], g["eps"], g["betas"], g["weight_decay"]) == (2e-4, 1e-6, (0.8, 0.9), 0.2)
    d = build_optimizer(torch.nn.Linear(3, 3), {}).param_groups[0]
    o = OptimConfig()
    assert (d["lr"], d["eps"], d["betas"], d["weight_decay"]) == (o.lr, o.eps, tuple(o.betas), o.weight_decay)
    with pytest.raises(Exception, match="epsilon"):
        build_optimizer(torch.nn.Linear(3, 3), {"epsilon": 1e-6})  # an unknown key is an error, not ignored


@pytest.mark.parametrize("value, cuda, cpu", [(32, "float32", "float32"), ("32-true", "float32", "float32"),
                                              ("bf16", "bfloat16", "float32"), ("bf16-mixed", "bfloat16", "float32"),
                                              ("bf16-true", "bfloat16", "float32")])
def test_one_precision_resolver(value, cuda, cpu):
    from engine.precision import compute_dtype_name

    assert compute_dtype_name(value, "cuda") == cuda and compute_dtype_name(value, "cpu") == cpu


@pytest.mark.parametrize("value", ["16", 16, "16-mixed", "fp16"])
def test_fp16_is_refused_the_same_way_everywhere(value):
    """PTL's 16 is fp16 with loss scaling: modeling read it as bf16, ppo as fp32, rm refused it on GPU."""
    from engine.precision import compute_dtype_name

    with pytest.raises(ValueError, match="rm.trainer.precision.*loss scaling"):
        compute_dtype_name(value, "cpu", "rm.trainer.precision")


def test_tokenizer_precedence():
    from engine.config import tokenizer_source

    cfg = {"data": {"tokenizer": {"model": None, "library": None}},
           "model": {"tokenizer": {"model": "/m/tok.model", "library": "sentencepiece"}, "restore_from_path": "/m.nemo"}}
    assert tokenizer_source(cfg, "rm") == ("/m/tok.model", "sentencepiece")
    cfg["data"]["tokenizer"] = {"model": "/prep/tokenizer.model", "library": "sentencepiece"}
    assert tokenizer_source(cfg, "ppo") == ("/prep/tokenizer.model", "sentencepiece")
    cfg["data"]["tokenizer"]["model"] = cfg["model"]["tokenizer"]["model"] = None
    assert tokenizer_source(cfg, "ppo") == ("/m.nemo", "sentencepiece")


def test_stages_import_engine_never_each_other():
    """The import drawing: rm_training and ppo on engine/ (and modeling/), no arrow between them; engine
    imports no stage and not the launcher."""
    def imports(pkg):
        found = set()
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module.split(".")[0])
                elif isinstance(node, ast.Import):
                    found.update(a.name.split(".")[0] for a in node.names)
        return found

    assert "ppo" not in imports("rm_training") and "rm_training" not in imports("ppo")
    assert not imports("engine") & {"rm_training", "ppo", "launcher", "data_prep", "evaluation", "modeling"}
    assert "rm_training" not in imports("evaluation") and "ppo" not in imports("evaluation")


def test_a_write_that_fails_on_a_full_disk_says_so_and_keeps_the_old_file(tmp_path, monkeypatch):
    """torch.save on a full disk raised 'basic_ios::clear: iostream error' at the end of a 40-step PPO run
    (H200, 64 GiB disk): atomic_write now names the file, the disk's free space and what to do, leaves
    the previous file whole and no temporary behind. The disk's fill level is the one thing faked."""
    import collections
    import errno
    import shutil

    from engine import io

    target = tmp_path / "ckpt.pt"
    target.write_text("the previous checkpoint")

    def fails(exc):
        with pytest.raises(OSError) as e:
            with io.atomic_write(str(target)) as tmp:
                open(tmp, "w").write("half a checkpoint")
                raise exc
        return e.value

    e = fails(OSError(errno.ENOSPC, "No space left on device"))
    assert e.errno == errno.ENOSPC and str(target) in str(e) and "MiB free" in str(e) and "run.dir" in str(e)
    assert target.read_text() == "the previous checkpoint" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    Usage = collections.namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(64 << 30, (64 << 30) - (5 << 20), 5 << 20))
    e = fails(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 230230208 vs 230230096"))
    assert e.errno == errno.ENOSPC and "has 5 MiB free" in str(e) and "unexpected pos" in str(e)
    # a .nemo (modeling.nemo_io.write_nemo: its own temporaries) says the same, and keeps the old one
    import torch

    from modeling.nemo_io import write_nemo

    nemo = tmp_path / "policy.nemo"
    nemo.write_text("the previous .nemo")

    def torch_save_on_a_full_disk(obj, f, *a, **k):
        open(f, "wb").write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 580748416 vs 580748304")

    with monkeypatch.context() as m:
        m.setattr(torch, "save", torch_save_on_a_full_disk)
        with pytest.raises(OSError) as e:
            write_nemo(str(nemo), {"a": 1}, {"w": torch.zeros(2)})
    assert e.value.errno == errno.ENOSPC and str(nemo) in str(e.value) and "has 5 MiB free" in str(e.value)
    assert nemo.read_text() == "the previous .nemo" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt",
                                                                                                       "policy.nemo"]
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(64 << 30, 0, 60 << 30))
    with pytest.raises(RuntimeError, match="a bug, not the disk"):
        with io.atomic_write(str(target)) as tmp:
            raise RuntimeError("a bug, not the disk")
    assert target.read_text() == "the previous checkpoint"
