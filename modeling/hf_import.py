"""Llama-family import from a Hugging Face safetensors directory or a llama.cpp GGUF file.

Both produce (ModelConfig, lazy tensor getter, tensor names in HF naming); state_dict.from_hf_llama
maps them onto our modules. GGUF tensors are dequantized to fp32 one at a time, and llama.cpp's
RoPE permutation of Q/K rows is undone (the inverse of its convert script, as transformers does).
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch

from .config import ModelConfig, ModelTokenizerConfig

Getter = Callable[[str], torch.Tensor]


def _unsupported(msg: str):
    raise NotImplementedError(f"Llama-family import: {msg}")


def config_from_hf(c: Dict[str, Any], name: str = "hf") -> ModelConfig:
    """A transformers LlamaConfig (config.json dict) -> ModelConfig with NeMo keys."""
    stablelm = c.get("model_type") == "stablelm"  # LayerNorm + partial rotary (modeling.hf_export's GPT class)
    if c.get("model_type", "llama") not in ("llama", "mistral", "stablelm"):
        _unsupported(f"model_type {c.get('model_type')!r} (llama, mistral and stablelm are mapped)")
    if stablelm and (c.get("use_qkv_bias") or c.get("qk_layernorm") or c.get("use_parallel_residual")):
        _unsupported("stablelm with use_qkv_bias, qk_layernorm or use_parallel_residual")
    if c.get("hidden_act", "silu") != "silu":
        _unsupported(f"hidden_act {c.get('hidden_act')!r}")
    if c.get("sliding_window"):
        _unsupported("sliding-window attention")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        _unsupported(f"rope scaling {rope!r}")
    if bool(c.get("attention_bias", False)) != bool(c.get("mlp_bias", False)):
        _unsupported("attention_bias != mlp_bias (one `bias` switch covers both)")
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    return ModelConfig(
        name=name,
        num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"], ffn_hidden_size=c["intermediate_size"],
        num_attention_heads=heads, num_query_groups=c.get("num_key_value_heads") or heads,
        kv_channels=None if head_dim * heads == c["hidden_size"] else head_dim,
        encoder_seq_length=c.get("max_position_embeddings", 2048),
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        position_embedding_type="rope",
        rotary_percentage=float(rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))),
        rotary_base=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
        normalization="layernorm" if stablelm else "rmsnorm",
        layernorm_epsilon=float(c.get("layer_norm_eps", 1e-5) if stablelm else c.get("rms_norm_eps", 1e-6)),
        activation="fast-swiglu", bias=bool(c.get("attention_bias", False)),
        share_embeddings_and_output_weights=bool(c.get("tie_word_embeddings", False)),
        vocab_size=c["vocab_size"], make_vocab_size_divisible_by=1,
        init_method_std=float(c.get("initializer_range", 0.02)),
    )


def read_hf_dir(path: str) -> Tuple[ModelConfig, Getter, List[str]]:
    from safetensors import safe_open

    with open(os.path.join(path, "config.json")) as f:
        cfg = config_from_hf(json.load(f), name=os.path.basename(os.path.normpath(path)))
    cfg.tokenizer = ModelTokenizerConfig(library="huggingface", model=path)  # tokenizer.json sits beside
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            where = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        single = os.path.join(path, "model.safetensors")
        with safe_open(single, framework="pt") as f:
            where = {k: single for k in f.keys()}
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                "(PyTorch .bin checkpoints are not read; convert with save_pretrained(safe_serialization=True))")
    handles: Dict[str, Any] = {}

    def get(name: str) -> torch.Tensor:
        file = where[name]
        if file not in handles:
            handles[file] = safe_open(file, framework="pt")
        return handles[file].get_tensor(name)

    return cfg, get, list(where)


# --- GGUF ---------------------------------------------------------------------------------------

_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    if hasattr(f, "contents"):
        return f.contents()
    v = f.parts[f.data[0]]  # older gguf: raw parts
    return bytes(v).decode() if v.dtype == np.uint8 else v.tolist()[0]


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GGUF_NAMES:
        return _GGUF_NAMES[gguf_name]
    _, i, part, kind = gguf_name.split(".")  # blk.{i}.{part}.{weight|bias}
    return f"model.layers.{i}.{_GGUF_LAYER[part]}.{kind}"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores Q/K rows of each head interleaved (pairs) for its RoPE kernel; undo it."""
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, d, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: str) -> Tuple[ModelConfig, Getter, List[str]]:
    from gguf import GGUFReader, dequantize

    r = GGUFReader(path)
    arch = _field(r, "general.architecture")
    if arch != "llama":
        _unsupported(f"GGUF architecture {arch!r} (only llama is mapped)")
    a = lambda k, d=None: _field(r, f"llama.{k}", d)  # noqa: E731
    tensors = {t.name: t for t in r.tensors}
    heads, kv = int(a("attention.head_count")), int(a("attention.head_count_kv", a("attention.head_count")))
    hidden = int(a("embedding_length"))
    vocab = int(tensors["token_embd.weight"].shape[-1])  # ggml shapes are reversed: [hidden, vocab]
    ctx = int(a("context_length", 2048))
    hf_cfg = {
        "num_hidden_layers": int(a("block_count")), "hidden_size": hidden,
        "intermediate_size": int(a("feed_forward_length")), "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": int(a("attention.key_length", a("rope.dimension_count", hidden // heads))),
        "max_position_embeddings": ctx, "rope_theta": float(a("rope.freq_base", 10000.0)),
        "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon", 1e-5)),
        "tie_word_embeddings": "output.weight" not in tensors, "vocab_size": vocab,
    }
    cfg = config_from_hf(hf_cfg, name=os.path.splitext(os.path.basename(path))[0])
    cfg.tokenizer = ModelTokenizerConfig(library="gguf", model=path)  # the vocab lives in the GGUF metadata

    def get(hf: str) -> torch.Tensor:
        g = by_hf[hf]
        t = tensors[g]
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w = w.reshape([int(x) for x in reversed(t.shape)])
        if ".attn_q." in g:
            w = _unpermute(w, heads)
        elif ".attn_k." in g:
            w = _unpermute(w, kv)
        return torch.from_numpy(np.array(w, dtype=np.float32, order="C"))  # own, writable copy (F32 data is a read-only memmap)

    by_hf = {_hf_name(n): n for n in tensors}
    return cfg, get, list(by_hf)
