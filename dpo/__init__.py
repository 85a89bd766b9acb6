"""DPO stage: direct preference optimization (and IPO, RPO) on the prep stage's comparisons against a
frozen reference, with NeMo-Aligner's gpt_dpo.yaml keys, on the engine's training loop."""


def run(cfg) -> dict:
    """Train the policy on preference pairs; returns its artifacts: {"nemo", "metrics", "plot", "checkpoints", "report"}."""
    from dpo.stage import run as _run

    return _run(cfg)
