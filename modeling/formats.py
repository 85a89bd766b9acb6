"""Which checkpoint format a path holds, told without torch (the launcher checks paths with it
before anything runs; modeling.checkpoint loads by it)."""
from __future__ import annotations

import os
import tarfile


def detect_format(path: str) -> str:
    """'nemo' (tar), 'nemo_dir' (extracted .nemo), 'hf' (config.json + safetensors) or 'gguf'."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "model_config.yaml")):
            return "nemo_dir"
        if os.path.exists(os.path.join(path, "config.json")):
            return "hf"
        raise ValueError(f"{path}: directory is neither an extracted .nemo (model_config.yaml) nor a HF model (config.json)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if path.endswith(".gguf"):
        return "gguf"
    if tarfile.is_tarfile(path):
        return "nemo"
    raise ValueError(f"{path}: not a .nemo archive, .gguf file, or model directory")
