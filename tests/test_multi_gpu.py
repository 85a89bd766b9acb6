"""Issue 8's GPU settings on the CPU: the rm stage with micro_batch_size = each rank's share of the
global batch and micro-batches split above `max_micro_batch_tokens` (so ranks run different numbers
of micro-batches under DDP's no_sync), through the real launcher, 1 process vs 2 gloo processes:
the same pairs, losses and accuracies every step. (2 processes == 1 at micro_batch_size 4 is in
tests/test_rm_training.py; ppo under 2 processes in tests/test_ppo_stage.py.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.kit import cli

TINY = ["model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4", "model.num_layers=2"]


def _train_rows(path):
    return [r for r in map(json.loads, Path(path).read_text().splitlines()) if r["split"] == "train"]


def test_rm_two_processes_per_rank_share_and_token_cap_match_one(tmp_path):
    run = tmp_path / "run"
    common = [f"run.dir={run}", *TINY, "data.max_pairs=160", "rm.model.global_batch_size=16",
              "rm.trainer.rm.max_steps=4", "rm.trainer.rm.val_check_interval=4", "rm.trainer.rm.save_interval=4",
              "rm.trainer.rm.limit_val_batches=1", "rm.model.data.length_grouping_window=4",
              "rm.model.data.max_micro_batch_tokens=1024",
              "rm.exp_manager.checkpoint_callback_params.always_save_nemo=false"]
    one = cli("stage=prep,rm", *common, "rm.model.micro_batch_size=16",
              f"rm.exp_manager.explicit_log_dir={run}/rm_1", timeout=300)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    two = cli("stage=rm", *common, "cluster.processes_per_node=2", "rm.model.micro_batch_size=8",
              f"rm.exp_manager.explicit_log_dir={run}/rm_2", timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "running (2 processes)" in two.stdout + two.stderr
    a, b = _train_rows(run / "rm_1" / "metrics.jsonl"), _train_rows(run / "rm_2" / "metrics.jsonl")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert (y["pairs"], y["tokens"]) == (x["pairs"], x["tokens"]) == (16, x["tokens"])
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5, abs=1e-6)
        assert y["accuracy"] == x["accuracy"]
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
    # optim.grad_sync_dtype=bf16: the gradient all-reduce travels in bf16 (half the bytes). Step 1's
    # loss is computed before any update (identical); later steps follow within bf16 rounding.
    bf = cli("stage=rm", *common, "cluster.processes_per_node=2", "rm.model.micro_batch_size=8",
             "rm.model.optim.grad_sync_dtype=bf16", f"rm.exp_manager.explicit_log_dir={run}/rm_2bf16", timeout=300)
    assert bf.returncode == 0, bf.stdout[-3000:] + bf.stderr[-3000:]
    c = _train_rows(run / "rm_2bf16" / "metrics.jsonl")
    assert len(c) == 4 and c[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-6)
    for x, y in zip(a, c):
        assert y["loss"] == pytest.approx(x["loss"], rel=2e-2)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=2e-2)
    assert any(y["grad_norm"] != x["grad_norm"] for x, y in zip(a, c))  # the bf16 path really ran


def test_grad_sync_dtype_is_checked():
    from rm_training.distributed import wrap_ddp
    import torch

    with pytest.raises(ValueError, match="grad_sync_dtype='fp16'"):
        wrap_ddp(torch.nn.Linear(2, 2), torch.device("cpu"), grad_sync_dtype="fp16")
