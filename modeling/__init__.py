"""One GPT implementation (NeMo Megatron GPT-2B-001 and the Llama family, chosen by config) with
checkpoint IO (.nemo, Hugging Face safetensors, GGUF), reward/value heads and KV-cache generation.

    from modeling import load_pretrained
    model = load_pretrained("model.nemo")          # or an HF dir, a .gguf, pkg:<package>/<file>
    logits = model(input_ids)                      # [batch, seq, vocab]
"""
import importlib

# Exports load on first use (PEP 562): `modeling.config` is read by the launcher, which must start
# in well under a second and never import torch.
_EXPORTS = {
    "config_from_nemo": "checkpoint", "config_to_nemo": "checkpoint", "load_config": "checkpoint",
    "load_pretrained": "checkpoint", "resolve_path": "checkpoint", "save_nemo": "checkpoint",
    "ModelConfig": "config", "ModelTokenizerConfig": "config",
    "GenerationOutput": "generation", "KVCache": "generation", "generate": "generation", "sample_next": "generation",
    "clear_generation_state": "generation",
    "RewardModel": "heads", "ValueModel": "heads", "attach_head": "heads", "last_token_index": "heads",
    "GPTModel": "model", "build_model": "model", "flops_per_token": "model", "compute_dtype": "model",
    "NemoArchive": "nemo_io", "extract_member": "nemo_io",
}
_ALIASES = {"CriticModel": "ValueModel"}  # NeMo-Aligner's name for the PPO value network
_SUBMODULES = ("presets",)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    target = _ALIASES.get(name, name)
    if target not in _EXPORTS:
        raise AttributeError(f"module 'modeling' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[target]}", __name__), target)
    globals()[name] = value
    return value


__all__ = [
    "ModelConfig", "ModelTokenizerConfig", "GPTModel", "RewardModel", "ValueModel", "CriticModel",
    "build_model", "load_pretrained", "load_config", "save_nemo", "resolve_path", "generate",
    "GenerationOutput", "KVCache", "sample_next", "clear_generation_state", "flops_per_token", "compute_dtype", "attach_head", "last_token_index",
    "NemoArchive", "extract_member", "config_from_nemo", "config_to_nemo", "presets",
]
