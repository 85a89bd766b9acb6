"""State-dict adapters: NeMo legacy Megatron checkpoints and Hugging Face Llama <-> our modules.

Our module tree already uses legacy Megatron names, so NeMo needs only the `model.` prefix and
two spelling differences (unfused `swiglu`, the optional rotary buffer). Hugging Face Llama needs
Q/K/V fused into Megatron's per-group layout and gate/up fused into one fc1.
"""
from __future__ import annotations

from typing import Dict, Iterable, Mapping

import torch

from .config import ModelConfig

NEMO_PREFIX = "model."
HEAD_PREFIX = "rm_head."  # NeMo-Aligner's name for the reward/critic head (model.rm_head.weight/bias)
_IGNORED_SUFFIXES = ("rotary_pos_emb.inv_freq", "._extra_state")


def to_nemo(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """Our keys -> NeMo legacy keys (`model.` + name). `swiglu` (not `fast-swiglu`) is stored unfused
    as NeMo's ParallelMLP holds it: dense_h_to_4h (activated half) and dense_h_to_4h_2."""
    out: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if cfg.activation == "swiglu" and ".mlp.dense_h_to_4h." in k:
            a, b = v.chunk(2, dim=0)
            out[NEMO_PREFIX + k] = a.contiguous()
            out[NEMO_PREFIX + k.replace("dense_h_to_4h.", "dense_h_to_4h_2.")] = b.contiguous()
        else:
            out[NEMO_PREFIX + k] = v
    return out


def from_nemo(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """NeMo legacy keys -> ours (heads keep their `rm_head.` names). Fails on megatron-core names,
    which this reader does not map (they come in distributed-checkpoint directories anyway)."""
    out: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.endswith(_IGNORED_SUFFIXES) or v is None:
            continue
        name = k[len(NEMO_PREFIX):] if k.startswith(NEMO_PREFIX) else k
        if name.startswith("decoder.") or ".linear_qkv." in name:
            raise ValueError(f"megatron-core (mcore_gpt) key {k!r}: only legacy Megatron .nemo weights are supported")
        out[name] = v
    for k in [k for k in out if ".mlp.dense_h_to_4h_2." in k]:
        fused = k.replace("dense_h_to_4h_2.", "dense_h_to_4h.")
        out[fused] = torch.cat([out[fused], out.pop(k)], dim=0)
    return out


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """HF q [heads*d, h], k/v [groups*d, h] -> Megatron rows: per group [its query heads, k, v].
    Works for biases ([rows]) too."""
    g, d = cfg.query_groups, cfg.head_dim
    hpg = cfg.num_attention_heads // g
    rest = q.shape[1:]
    parts = [q.reshape(g, hpg, d, *rest), k.reshape(g, 1, d, *rest), v.reshape(g, 1, d, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_qkv(w: torch.Tensor, cfg: ModelConfig):
    """Inverse of fuse_qkv."""
    g, d = cfg.query_groups, cfg.head_dim
    hpg = cfg.num_attention_heads // g
    rest = w.shape[1:]
    w = w.reshape(g, hpg + 2, d, *rest)
    return (w[:, :hpg].reshape(-1, *rest), w[:, hpg].reshape(-1, *rest), w[:, hpg + 1].reshape(-1, *rest))


_HF_LAYER = "model.layers.{i}."
_OURS_LAYER = "language_model.encoder.layers.{i}."


def from_hf_llama(get, names: Iterable[str], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """HF LlamaForCausalLM names -> ours. `get(name)` returns a tensor (lazy, so a sharded
    safetensors dir or a GGUF file is read one tensor at a time)."""
    names = set(names)
    sd = {
        "language_model.embedding.word_embeddings.weight": get("model.embed_tokens.weight"),
    }
    if not cfg.share_embeddings_and_output_weights and "lm_head.weight" in names:
        sd["language_model.output_layer.weight"] = get("lm_head.weight")
    if "score.weight" in names:  # *ForSequenceClassification / *ForTokenClassification (hf_export's heads)
        sd[HEAD_PREFIX + "weight"] = get("score.weight")
        sd[HEAD_PREFIX + "bias"] = get("score.bias") if "score.bias" in names else torch.zeros(1, dtype=sd[HEAD_PREFIX + "weight"].dtype)
    norms = [("model.norm.", "language_model.encoder.final_layernorm.")]
    for i in range(cfg.num_layers):
        hf, me = _HF_LAYER.format(i=i), _OURS_LAYER.format(i=i)
        norms += [(hf + n, me + n) for n in ("input_layernorm.", "post_attention_layernorm.")]
    for hf_norm, our_norm in norms:  # LayerNorm (stablelm) has a bias, RMSNorm none
        sd[our_norm + "weight"] = get(hf_norm + "weight")
        if hf_norm + "bias" in names:
            sd[our_norm + "bias"] = get(hf_norm + "bias")
    for i in range(cfg.num_layers):
        hf, me = _HF_LAYER.format(i=i), _OURS_LAYER.format(i=i)
        for suffix in ("weight", "bias"):
            if hf + f"self_attn.q_proj.{suffix}" in names:
                qkv = [get(hf + f"self_attn.{p}_proj.{suffix}") for p in "qkv"]
                sd[me + f"self_attention.query_key_value.{suffix}"] = fuse_qkv(*qkv, cfg)
            if hf + f"self_attn.o_proj.{suffix}" in names:
                sd[me + f"self_attention.dense.{suffix}"] = get(hf + f"self_attn.o_proj.{suffix}")
            if hf + f"mlp.gate_proj.{suffix}" in names:
                gate, up = get(hf + f"mlp.gate_proj.{suffix}"), get(hf + f"mlp.up_proj.{suffix}")
                sd[me + f"mlp.dense_h_to_4h.{suffix}"] = torch.cat([gate, up], dim=0)
                sd[me + f"mlp.dense_4h_to_h.{suffix}"] = get(hf + f"mlp.down_proj.{suffix}")
    return sd


def to_hf_llama(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """Ours -> HF LlamaForCausalLM names (for exporting, and for testing against transformers)."""
    out = {
        "model.embed_tokens.weight": sd["language_model.embedding.word_embeddings.weight"],
        "model.norm.weight": sd["language_model.encoder.final_layernorm.weight"],
    }
    if "language_model.output_layer.weight" in sd:
        out["lm_head.weight"] = sd["language_model.output_layer.weight"]
    for i in range(cfg.num_layers):
        hf, me = _HF_LAYER.format(i=i), _OURS_LAYER.format(i=i)
        out[hf + "input_layernorm.weight"] = sd[me + "input_layernorm.weight"]
        out[hf + "post_attention_layernorm.weight"] = sd[me + "post_attention_layernorm.weight"]
        for suffix in ("weight", "bias"):
            if me + f"self_attention.query_key_value.{suffix}" in sd:
                q, k, v = split_qkv(sd[me + f"self_attention.query_key_value.{suffix}"], cfg)
                out.update({hf + f"self_attn.{n}_proj.{suffix}": t for n, t in zip("qkv", (q, k, v))})
            if me + f"self_attention.dense.{suffix}" in sd:
                out[hf + f"self_attn.o_proj.{suffix}"] = sd[me + f"self_attention.dense.{suffix}"]
            if me + f"mlp.dense_h_to_4h.{suffix}" in sd:
                gate, up = sd[me + f"mlp.dense_h_to_4h.{suffix}"].chunk(2, dim=0)
                out[hf + f"mlp.gate_proj.{suffix}"], out[hf + f"mlp.up_proj.{suffix}"] = gate, up
                out[hf + f"mlp.down_proj.{suffix}"] = sd[me + f"mlp.dense_4h_to_h.{suffix}"]
    return {k: v.contiguous() for k, v in out.items()}
