"""One GPT implementation (NeMo Megatron GPT-2B-001 and the Llama family, chosen by config) with
checkpoint IO (.nemo, Hugging Face safetensors, GGUF), reward/value heads and KV-cache generation.

    from modeling import load_pretrained
    model = load_pretrained("model.nemo")          # or an HF dir, a .gguf, pkg:<package>/<file>
    logits = model(input_ids)                      # [batch, seq, vocab]
"""
from .checkpoint import config_from_nemo, config_to_nemo, load_config, load_pretrained, resolve_path, save_nemo
from . import presets
from .config import ModelConfig, ModelTokenizerConfig
from .generation import GenerationOutput, KVCache, generate, sample_next
from .heads import RewardModel, ValueModel, attach_head, last_token_index
from .model import GPTModel, build_model, flops_per_token
from .nemo_io import NemoArchive, extract_member

CriticModel = ValueModel  # NeMo-Aligner's name for the PPO value network

__all__ = [
    "ModelConfig", "ModelTokenizerConfig", "GPTModel", "RewardModel", "ValueModel", "CriticModel",
    "build_model", "load_pretrained", "load_config", "save_nemo", "resolve_path", "generate",
    "GenerationOutput", "KVCache", "sample_next", "flops_per_token", "attach_head", "last_token_index",
    "NemoArchive", "extract_member", "config_from_nemo", "config_to_nemo", "presets",
]
