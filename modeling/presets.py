"""Named architectures: GPT-2B-001 (NEMO_FORMATS.md section 2) and toy configs of both families
for CPU tests. Each call returns a fresh ModelConfig."""
from __future__ import annotations

import dataclasses

from .config import ModelConfig


def gpt_2b_001() -> ModelConfig:
    return ModelConfig(
        name="gpt_2b", num_layers=24, hidden_size=2048, ffn_hidden_size=5440, num_attention_heads=16,
        kv_channels=None, encoder_seq_length=4096, max_position_embeddings=4096, position_embedding_type="rope",
        rotary_percentage=0.5, normalization="layernorm1p", layernorm_epsilon=1e-5, activation="fast-swiglu",
        bias=False, share_embeddings_and_output_weights=False, make_vocab_size_divisible_by=128,
        init_method_std=0.014, use_scaled_init_method=True, hidden_dropout=0.0, attention_dropout=0.0,
    )


def tiny_gpt() -> ModelConfig:
    """GPT-2B-001's architecture at toy size (half rotary, layernorm1p, fast-swiglu, untied)."""
    return dataclasses.replace(gpt_2b_001(), name="tiny_gpt", num_layers=2, hidden_size=64, ffn_hidden_size=96,
                               num_attention_heads=4, encoder_seq_length=256, max_position_embeddings=256,
                               make_vocab_size_divisible_by=8)


def tiny_llama() -> ModelConfig:
    """Llama family at toy size (rmsnorm, grouped-query attention, full rotary, tied embeddings)."""
    return ModelConfig(name="tiny_llama", num_layers=2, hidden_size=64, ffn_hidden_size=112, num_attention_heads=4,
                       num_query_groups=2, normalization="rmsnorm", rotary_base=5000.0, activation="fast-swiglu",
                       share_embeddings_and_output_weights=True, make_vocab_size_divisible_by=1)
