"""Reward-model training stage: Bradley-Terry on comparison pairs (NeMo-Aligner's training_rm.yaml).

`run(cfg)` is the stage entry the launcher calls. The generic pieces (optim, checkpointing,
metrics, distributed, progress) are shared with the ppo stage.
"""


def run(cfg) -> dict:
    """Train a reward model; returns its artifacts: {"nemo", "metrics", "plot", "test_metrics",
    "checkpoints", "report"} (absolute paths in the stage folder)."""
    from rm_training.stage import run as _run

    return _run(cfg)
