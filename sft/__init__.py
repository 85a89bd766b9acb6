"""SFT stage: supervised fine-tuning on the prep stage's chosen dialogues (loss on the assistant turns)
or a prompt/response JSONL, with NeMo-Aligner's gpt_sft.yaml keys, on the engine's training loop."""


def run(cfg) -> dict:
    """Fine-tune the policy; returns its artifacts: {"nemo", "metrics", "plot", "checkpoints", "report"}."""
    from sft.stage import run as _run

    return _run(cfg)
