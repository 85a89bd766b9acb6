"""Reward-model training stage: Bradley-Terry on comparison pairs (NeMo-Aligner's training_rm.yaml).

`run(cfg)` is the stage entry the launcher calls. It trains on engine/'s loop (engine/loop.py); what
it shares with other stages (optim, checkpointing, metrics, distributed, progress) lives there.
"""


def run(cfg) -> dict:
    """Train a reward model; returns its artifacts: {"nemo", "metrics", "plot", "test_metrics",
    "checkpoints", "report"} (absolute paths in the stage folder)."""
    from rm_training.stage import run as _run

    return _run(cfg)
