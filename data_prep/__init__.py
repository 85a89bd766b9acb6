"""Data-prep stage: HH-RLHF -> prompt/comparison JSONL -> Megatron mmap.

`run(cfg)` is the stage entry the launcher calls; `python -m data_prep` runs the same standalone.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def _data_config(section):
    """The `data:` section as a DataConfig (the launcher hands a structured DictConfig)."""
    from data_prep.config import DataConfig

    if isinstance(section, DataConfig):
        return section
    from omegaconf import OmegaConf

    if OmegaConf.is_config(section):
        merged = OmegaConf.merge(OmegaConf.structured(DataConfig), section)
        return OmegaConf.to_object(merged)
    raise TypeError(f"cfg.data: expected DataConfig or DictConfig, got {type(section).__name__}")


def run(cfg) -> dict:
    """Returns {"data_prefix": {train, validation, test}, "prompts": {...}, "comparisons": {...},
    "tokenizer": path, "report": path}, all absolute paths inside `cfg.run.stage_dir`."""
    from data_prep.stage import prepare

    data = _data_config(cfg.data)
    restore = None
    if data.tokenizer.library == "nemo" and data.tokenizer.model is None:
        restore = cfg.model.restore_from_path
    return prepare(data, cfg.run.stage_dir, restore_from_path=restore)
