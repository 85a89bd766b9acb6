"""Data-prep stage: HH-RLHF -> prompt/comparison JSONL -> Megatron mmap."""


def run(cfg):
    """Returns {"data_prefix": {...}, "prompts": {...}, "tokenizer": path, "report": path}."""
    raise NotImplementedError("the prep stage is not implemented yet (issue 4)")
