"""A hand-built reward model with a known preference, for tests and demos of the PPO loop when no
trained reward model is at hand: the reward is (up to a monotone map) the fraction of tokens of the
whole sequence whose id is in a chosen class. Saved as a regular `.nemo` RewardModel, so it goes
through the same loading path as the rm stage's output.

How: one layer; zero query/key weights make attention a uniform average over the causal prefix;
embeddings differ only in one coordinate (+c for the class, -c otherwise), which the value/output
projections copy into a second coordinate; the MLP is switched off; the head reads that coordinate.
The last real token's hidden state therefore carries the class fraction of the sequence.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from modeling import ModelConfig, ModelTokenizerConfig, RewardModel, save_nemo


def even_quarter(ids: torch.Tensor) -> torch.Tensor:
    """The default class: ids divisible by 4 (a quarter of the vocabulary)."""
    return ids % 4 == 0


@torch.no_grad()
def token_class_reward_model(vocab_size: int, in_class: Callable[[torch.Tensor], torch.Tensor] = even_quarter,
                             hidden: int = 16, seed: int = 0) -> RewardModel:
    cfg = ModelConfig(name="toy_token_class_rm", num_layers=1, hidden_size=hidden, ffn_hidden_size=hidden,
                      num_attention_heads=1, normalization="layernorm", rotary_percentage=0.5,
                      activation="gelu", make_vocab_size_divisible_by=8, encoder_seq_length=4096,
                      max_position_embeddings=4096)
    vocab = cfg.padded_vocab_size(vocab_size)
    g = torch.Generator().manual_seed(seed)
    model = RewardModel(cfg, vocab)
    for p in model.parameters():
        p.zero_()
    base = torch.randn(hidden, generator=g)
    base[:2] = 0.0
    base -= base.mean()
    sign = torch.where(in_class(torch.arange(vocab)), 1.0, -1.0)
    emb = base.expand(vocab, hidden).clone()
    emb[:, 0] = sign
    lm = model.language_model
    lm.embedding.word_embeddings.weight.copy_(emb)
    layer = lm.encoder.layers[0]
    for norm in (layer.input_layernorm, layer.post_attention_layernorm, lm.encoder.final_layernorm):
        norm.weight.fill_(1.0)
        norm.bias.zero_()
    d = cfg.head_dim
    qkv = layer.self_attention.query_key_value.weight  # rows [q (d), k (d), v (d)] for the one head
    qkv[2 * d, 0] = 1.0  # v[0] = LN(x)[0]
    layer.self_attention.dense.weight[1, 0] = 1.0  # hidden[1] += mean over the prefix of v[0]
    model.rm_head.weight[0, 1] = 1.0
    # rescale: all-out-of-class -> -1, all-in-class -> +1
    ids = torch.arange(vocab)
    a = int(ids[in_class(ids)][1])
    b = int(ids[~in_class(ids)][1])
    hi, lo = model(torch.full((1, 8), a)).item(), model(torch.full((1, 8), b)).item()
    scale = 2.0 / (hi - lo)
    model.rm_head.weight.mul_(scale)
    model.rm_head.bias.fill_(-1.0 - lo * scale)
    return model.eval()


def save_token_class_reward_model(path: str, tokenizer_path: Optional[str], vocab_size: int, library: str = "sentencepiece",
                                  **kw) -> str:
    model = token_class_reward_model(vocab_size, **kw)
    model.config.tokenizer = ModelTokenizerConfig(library=library, model=None)
    return save_nemo(model, path, tokenizer_path=tokenizer_path)
