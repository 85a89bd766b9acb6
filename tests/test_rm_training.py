"""The rm stage for real on CPU: through the launcher (prep -> rm, accuracy rises, manifest
artifacts, .nemo loads back), exact resume after a preemption, and 2 DDP processes (gloo) giving
the losses of 1 process."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.kit import cli, compose_cfg

TINY = ["model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4", "model.num_layers=2"]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """prep + rm through the real launcher, shortened to 1 epoch (20 steps of 32 pairs)."""
    run = tmp_path_factory.mktemp("qs")
    r = cli("stage=prep,rm", f"run.dir={run}", "rm.trainer.rm.max_epochs=1", "rm.trainer.rm.val_check_interval=10",
            *TINY, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run


def _rows(path, split):
    return [json.loads(l) for l in Path(path).read_text().splitlines() if json.loads(l)["split"] == split]


def test_launcher_quickstart_learns_and_records_artifacts(quickstart):
    manifest = json.loads((quickstart / "manifest.json").read_text())
    rm = manifest["stages"]["rm"]
    assert rm["status"] == "succeeded"
    art = rm["artifacts"]
    for key in ("nemo", "metrics", "plot", "test_metrics", "checkpoints"):
        assert os.path.exists(art[key]), key
    val = _rows(art["metrics"], "val")
    assert [v["step"] for v in val] == [10, 20]
    train = _rows(art["metrics"], "train")
    first = train[0]["accuracy"]  # step 1's forward ran on the initial weights: about chance
    assert first < 0.75 and val[-1]["accuracy"] >= 0.9 and val[-1]["accuracy"] >= val[0]["accuracy"], (first, val)
    assert val[-1]["loss"] < 0.5
    test = json.loads(Path(art["test_metrics"]).read_text())
    assert test["accuracy"] >= 0.8 and test["pairs"] == 160
    assert os.path.getsize(art["plot"]) > 1000
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(quickstart / "rm" / "tensorboard"))
    # the exported reward model loads back with its head and tokenizer, and scores like the trainer
    from data_prep.tokenizers import load_tokenizer
    from modeling import NemoArchive, load_pretrained

    model = load_pretrained(art["nemo"], head="reward")
    assert model.config.tokenizer.model.startswith("nemo:")
    with NemoArchive(art["nemo"]) as a:
        assert model.config.tokenizer.model[5:] in a
    tok = load_tokenizer(manifest["stages"]["prep"]["artifacts"]["tokenizer"])
    good = "User: How do I start running?\n\nAssistant: Happy to help! Begin with short intervals. Good luck, you can do this."
    bad = "User: How do I start running?\n\nAssistant: Not my problem. Why would anyone care?"
    with torch.no_grad():
        r = model(torch.tensor([tok.encode(good) + [tok.eos_id]]))[0], model(torch.tensor([tok.encode(bad) + [tok.eos_id]]))[0]
    assert r[0] > r[1]


def _cfg(quickstart, stage_dir, *extra):
    prep = json.loads((quickstart / "manifest.json").read_text())["stages"]["prep"]["artifacts"]
    cfg = compose_cfg(["stage=rm", *TINY, "rm.trainer.rm.max_steps=6", "rm.trainer.rm.val_check_interval=3",
                       "rm.trainer.rm.save_interval=3", "rm.model.global_batch_size=16", "rm.model.micro_batch_size=4",
                       "rm.trainer.rm.limit_val_batches=2", *extra])
    cfg.run.stage_dir = str(stage_dir)
    cfg.rm.exp_manager.explicit_log_dir = str(stage_dir)
    cfg.data.tokenizer.model = prep["tokenizer"]
    OmegaConf.update(cfg, "rm.model.data.data_prefix", {k: [v] for k, v in prep["data_prefix"].items()}, merge=False)
    return cfg


def test_resume_after_preemption_continues_exactly(quickstart, tmp_path, monkeypatch):
    import rm_training
    from rm_training.trainer import RMTrainer

    full = rm_training.run(_cfg(quickstart, tmp_path / "full"))
    real_step = RMTrainer.train_step

    def step_and_preempt_at_4(self, step):
        out = real_step(self, step)
        if step == 3:  # the 4th step: a Slurm preemption notice arrives while it runs
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    monkeypatch.setattr(RMTrainer, "train_step", step_and_preempt_at_4)
    with pytest.raises(SystemExit) as exc:
        rm_training.run(_cfg(quickstart, tmp_path / "cut"))
    assert exc.value.code == 75
    ckpts = json.loads((tmp_path / "cut" / "checkpoints" / "index.json").read_text())["checkpoints"]
    assert max(c["step"] for c in ckpts) == 4
    monkeypatch.setattr(RMTrainer, "train_step", real_step)
    resumed = rm_training.run(_cfg(quickstart, tmp_path / "cut"))
    a, b = _rows(full["metrics"], "train"), _rows(resumed["metrics"], "train")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit-identical on CPU
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    assert _rows(full["metrics"], "val")[-1]["loss"] == _rows(resumed["metrics"], "val")[-1]["loss"]


def test_two_ddp_processes_match_one(quickstart, tmp_path):
    import rm_training

    one = rm_training.run(_cfg(quickstart, tmp_path / "one", "rm.trainer.rm.max_steps=3"))
    prep = json.loads((quickstart / "manifest.json").read_text())["stages"]["prep"]["artifacts"]
    prefixes = "{" + ",".join(f"{k}:[{v}]" for k, v in prep["data_prefix"].items()) + "}"
    run = tmp_path / "two"
    r = cli("stage=rm", f"run.dir={run}", "cluster.processes_per_node=2", *TINY, "rm.trainer.rm.max_steps=3",
            "rm.trainer.rm.val_check_interval=3", "rm.trainer.rm.save_interval=3", "rm.model.global_batch_size=16",
            "rm.model.micro_batch_size=4", "rm.trainer.rm.limit_val_batches=2", f"data.tokenizer.model={prep['tokenizer']}",
            f"rm.model.data.data_prefix={prefixes}", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    if not os.environ.get("OMP_NUM_THREADS"):  # each rank takes its share of the cores, not all of them
        share = max(1, len(os.sched_getaffinity(0)) // 2)
        assert f"{share} CPU threads for this rank (2 ranks on this node" in (run / "rm" / "log.txt").read_text()
    two = json.loads((run / "manifest.json").read_text())["stages"]["rm"]["artifacts"]
    a, b = _rows(one["metrics"], "train"), _rows(two["metrics"], "train")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert y["pairs"] == x["pairs"] == 16
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5, abs=1e-6)
        assert y["accuracy"] == x["accuracy"]
    assert _rows(two["metrics"], "val")[-1]["loss"] == pytest.approx(_rows(one["metrics"], "val")[-1]["loss"], rel=1e-5)


def test_torch_profile_traces_the_requested_steps(quickstart, tmp_path):
    import rm_training

    out = rm_training.run(_cfg(quickstart, tmp_path / "prof", "rm.model.torch_profile.enabled=true",
                               "rm.model.torch_profile.start_step=2", "rm.model.torch_profile.end_step=3"))
    trace = tmp_path / "prof" / "profile" / "rank0_steps2-3.json"
    events = json.loads(trace.read_text())["traceEvents"]
    steps = [e for e in events if e.get("name", "").startswith("Optimizer.step")]
    assert len(steps) == 2  # steps 2 and 3, not 1 or 4-6
    assert "aten::mm" in (tmp_path / "prof" / "profile" / "rank0_steps2-3.txt").read_text()
    assert len(_rows(out["metrics"], "train")) == 6  # training went on after the trace


def test_torch_profile_rejects_an_empty_range(quickstart, tmp_path):
    import rm_training

    with pytest.raises(ValueError, match="start_step <= end_step"):
        rm_training.run(_cfg(quickstart, tmp_path / "bad", "rm.model.torch_profile.enabled=true",
                             "rm.model.torch_profile.start_step=5", "rm.model.torch_profile.end_step=2"))


@pytest.mark.parametrize("interval, val_steps, ckpt_steps", [(0, [3], [3]), (2, [2, 3], [2, 3])])
def test_interval_zero_means_only_at_the_end(tmp_path, interval, val_steps, ckpt_steps):
    """trainer.rm.val_check_interval / save_interval = 0: validate and checkpoint once, at the end
    (before, the stage turned 0 into 1, every step, and the trainer itself divided by it)."""
    import numpy as np

    from rm_training.data import PairDataset
    from rm_training.trainer import LoopSettings, RMTrainer
    from tests.test_rm_packing import tiny, write_pairs

    lengths = [(int(a), int(b)) for a, b in np.random.default_rng(2).integers(2, 30, (32, 2))]
    ds = PairDataset([write_pairs(tmp_path / "d", lengths)], seq_length=32)
    optim = {"name": "adamw", "lr": 1e-3, "sched": {"name": "CosineAnnealing", "warmup_steps": 0, "min_lr": 1e-4}}
    s = LoopSettings(global_batch_size=8, micro_batch_size=4, max_steps=3, val_check_interval=interval,
                     save_interval=interval, save_top_k=5)
    saved = []
    tr = RMTrainer(tiny(), optim, s, ds, ds, 0, str(tmp_path / "rm"), torch.device("cpu"),
                   on_checkpoint=lambda path, best: saved.append(path))
    tr.fit()
    assert [r["step"] for r in _rows(tmp_path / "rm" / "metrics.jsonl", "val")] == val_steps
    assert len(saved) == len(ckpt_steps) and all(f"step={n}" in p for n, p in zip(ckpt_steps, saved)), saved


def test_a_changed_key_or_force_retrains_instead_of_resuming(quickstart, tmp_path, caplog):
    """Issue 18 #1: re-running with rm.model.optim.lr changed resumed the finished run at its last step,
    trained 0 steps and exported the old weights. Now the old checkpoints are moved aside, named."""
    import logging

    import rm_training
    from modeling import load_pretrained

    first = rm_training.run(_cfg(quickstart, tmp_path / "rm"))
    w0 = load_pretrained(first["nemo"], head="reward").state_dict()
    with caplog.at_level(logging.INFO):
        changed = rm_training.run(_cfg(quickstart, tmp_path / "rm", "rm.model.optim.lr=3e-3"))
    assert "resumed from" not in caplog.text and "rm.model.optim.lr" in caplog.text
    assert [r["step"] for r in _rows(changed["metrics"], "train")] == [1, 2, 3, 4, 5, 6]
    w1 = load_pretrained(changed["nemo"], head="reward").state_dict()
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    assert len(list(tmp_path.glob("rm/checkpoints.old-*"))) == 1
    caplog.clear()
    with caplog.at_level(logging.INFO):  # force=true: the launcher gives the stage a launch id
        forced = rm_training.run(_cfg(quickstart, tmp_path / "rm", "rm.model.optim.lr=3e-3", "run.force_id=L1"))
    assert "force=true" in caplog.text and "resumed from" not in caplog.text
    assert [r["step"] for r in _rows(forced["metrics"], "train")] == [1, 2, 3, 4, 5, 6]
