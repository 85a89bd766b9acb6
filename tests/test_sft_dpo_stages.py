"""stage=sft and stage=dpo for real on CPU: through the real launcher (prep -> sft -> dpo, the held-out SFT
loss falls, DPO's held-out implicit-reward accuracy rises from the reference's 0 and its loss from ln 2,
dpo starts from sft's .nemo through the manifest), and exact resume after a preemption signal."""
from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.kit import CONF, cli, compose_cfg

TINY = ["model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4", "model.num_layers=2"]
DROP = ("time", "tokens_per_s", "pairs_per_s", "step_time")


def _rows(path, split):
    rows = [json.loads(x) for x in Path(path).read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in DROP} for r in rows if r["split"] == split]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("align")
    r = cli("stage=prep,sft,dpo", f"run.dir={run}", *TINY, "sft.trainer.sft.max_steps=8",
            "sft.trainer.sft.val_check_interval=4", "sft.trainer.sft.limit_val_batches=2",
            "dpo.trainer.dpo.max_steps=6", "dpo.trainer.dpo.val_check_interval=3", "dpo.trainer.dpo.limit_val_batches=2",
            timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run


def test_sft_through_the_launcher_held_out_loss_falls(run_dir):
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    art = stages["sft"]["artifacts"]
    assert stages["sft"]["status"] == "succeeded"
    for key in ("nemo", "metrics", "plot", "checkpoints", "report"):
        assert os.path.exists(art[key]), key
    val = _rows(art["metrics"], "val")
    assert [v["step"] for v in val] == [4, 8]
    first_train = _rows(art["metrics"], "train")[0]["loss"]  # step 1 ran on the initial weights
    assert val[-1]["loss"] < val[0]["loss"] < first_train, (first_train, val)
    report = json.loads(Path(art["report"]).read_text())
    assert report["train"]["samples"] == 640 and report["train"]["target_tokens"] > 0
    from modeling import load_pretrained

    model = load_pretrained(art["nemo"])  # the LM head comes back: a policy dpo and ppo can start from
    assert model.with_lm_head and model.config.tokenizer.model.startswith("nemo:")


def test_dpo_through_the_launcher_accuracy_rises_from_the_sft_model(run_dir):
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    art = stages["dpo"]["artifacts"]
    val = _rows(art["metrics"], "val")
    assert [v["step"] for v in val] == [0, 3, 6]
    # step 0: policy == reference, every log ratio 0: loss ln 2, no pair ranked right
    assert val[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and val[0]["accuracy"] == 0.0
    assert val[-1]["accuracy"] >= 0.9 and val[-1]["margin"] > val[1]["margin"] > 0
    assert val[-1]["loss"] < 0.3
    assert stages["sft"]["artifacts"]["nemo"] in (run_dir / "dpo" / "log.txt").read_text()  # the hand-off
    cfg = OmegaConf.load(run_dir / "dpo" / "config.yaml")
    assert cfg.dpo.pretrained_checkpoint.restore_from_path == stages["sft"]["artifacts"]["nemo"]


def _cfg(run_dir, stage, stage_dir, *extra):
    prep = json.loads((run_dir / "manifest.json").read_text())["stages"]["prep"]["artifacts"]
    common = {"sft": ["sft.model.data.train_ds.global_batch_size=8", "sft.model.data.train_ds.micro_batch_size=4",
                      "sft.trainer.sft.max_steps=4", "sft.trainer.sft.val_check_interval=2",
                      "sft.trainer.sft.save_interval=10", "sft.trainer.sft.limit_val_batches=1"],
              "dpo": ["dpo.model.global_batch_size=8", "dpo.model.micro_batch_size=4", "dpo.trainer.dpo.max_steps=4",
                      "dpo.trainer.dpo.val_check_interval=2", "dpo.trainer.dpo.save_interval=10",
                      "dpo.trainer.dpo.limit_val_batches=1"]}[stage]
    cfg = compose_cfg([f"stage={stage}", *TINY, *common, *extra])
    cfg.run.stage_dir = str(stage_dir)
    cfg.data.tokenizer.model = prep["tokenizer"]
    OmegaConf.update(cfg, f"{stage}.model.data.data_prefix", {k: [v] for k, v in prep["comparisons"].items()},
                     merge=False)
    return cfg


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_preemption_checkpoints_exits_75_and_resumes_exactly(stage, run_dir, tmp_path, monkeypatch):
    import importlib

    pkg = importlib.import_module(stage)
    task = importlib.import_module(f"{stage}.trainer").SFTTask if stage == "sft" else \
        importlib.import_module("dpo.trainer").DPOTask
    straight = pkg.run(_cfg(run_dir, stage, tmp_path / "straight"))
    real = task.train_step

    def step_then_signal(self, i):
        out = real(self, i)
        if i == 2:  # SIGUSR1 while step 3 runs: saved at its end, then exit 75
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    monkeypatch.setattr(task, "train_step", step_then_signal)
    with pytest.raises(SystemExit) as exc:
        pkg.run(_cfg(run_dir, stage, tmp_path / "cut"))
    assert exc.value.code == 75
    index = json.loads((tmp_path / "cut" / "checkpoints" / "index.json").read_text())["checkpoints"]
    assert max(c["step"] for c in index) == 3
    monkeypatch.setattr(task, "train_step", real)
    resumed = pkg.run(_cfg(run_dir, stage, tmp_path / "cut"))
    a, b = _rows(straight["metrics"], "train"), _rows(resumed["metrics"], "train")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert a == b  # bit-identical on the CPU: loss, lr, grad norm, every metric
    assert _rows(straight["metrics"], "val") == _rows(resumed["metrics"], "val")


def test_shipped_yaml_keys_exist_in_the_dataclasses():
    """Defaults live in sft/config.py and dpo/config.py; conf/sft and conf/dpo may only override them."""
    import dataclasses

    from dpo.config import DPOConfig
    from sft.config import SFTConfig

    def check(node, schema, where):
        names = {f.name for f in dataclasses.fields(schema)}
        for key, value in node.items():
            assert key in names, f"{where}.{key} is not in {schema.__name__}"
            default = getattr(schema(), key)
            if isinstance(value, dict) and dataclasses.is_dataclass(default):
                check(value, type(default), f"{where}.{key}")

    for group, schema in (("sft/gpt_sft.yaml", SFTConfig), ("dpo/gpt_dpo.yaml", DPOConfig)):
        check(OmegaConf.to_container(OmegaConf.load(CONF / group)), schema, group)


def test_a_bad_preference_loss_is_refused_naming_the_key(run_dir, tmp_path):
    import dpo

    with pytest.raises(ValueError, match=r"dpo.model.dpo.preference_loss='kto': expected one of dpo \| ipo"):
        dpo.run(_cfg(run_dir, "dpo", tmp_path / "bad", "dpo.model.dpo.preference_loss=kto"))
    assert not (tmp_path / "bad").exists()  # refused before anything was written
