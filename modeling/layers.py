"""Transformer building blocks. Module and parameter names follow legacy Megatron (NeMo
`mcore_gpt: false`) so a `.nemo` state dict maps onto them by adding the `model.` prefix.

One code path serves both families; `ModelConfig` picks the variant:
  GPT-2B-001: layernorm1p, rotary on half of each head, fused fast-swiglu, no linear biases.
  Llama:      rmsnorm, grouped-query attention, full rotary, (fast-)swiglu, no biases.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

# enable_gqa lets SDPA broadcast K/V heads itself (no repeat_interleave copy); torch >= 2.5.
_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class Norm(nn.Module):
    """layernorm | layernorm1p (output norm(x) * (1 + w) + b, weight stored zero-centred) | rmsnorm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.eps = cfg.normalization, cfg.layernorm_epsilon
        if self.kind not in ("layernorm", "layernorm1p", "rmsnorm"):
            raise ValueError(f"normalization={self.kind!r}: expected layernorm | layernorm1p | rmsnorm")
        h = cfg.hidden_size
        self.weight = nn.Parameter(torch.empty(h))
        # RMSNorm (Llama) has no bias; both LayerNorms keep theirs even when bias=False (NeMo does).
        self.bias = nn.Parameter(torch.empty(h)) if self.kind != "rmsnorm" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, 0.0 if self.kind == "layernorm1p" else 1.0)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rmsnorm":
            # Same order of operations as transformers' LlamaRMSNorm: fp32 statistics, weight in x's dtype.
            xf = x.float()
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * xf.to(x.dtype)
        w = self.weight + 1 if self.kind == "layernorm1p" else self.weight
        return F.layer_norm(x, (x.shape[-1],), w, self.bias, self.eps)


class Rotary(nn.Module):
    """Rotary embedding on the first `rotary_dim` dims of each head (rotate-half convention, as both
    Megatron and transformers' Llama use). cos/sin come from positions on the fly: positions differ
    per sample during batched generation, and nothing here depends on a table size."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dim, self.base = cfg.rotary_dim, cfg.rotary_base
        self._inv_freq: dict = {}  # per device; a plain attribute, so meta-device builds need no fixing

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        f = self._inv_freq.get(device)
        if f is None:
            # same expression as transformers, so fp32 cos/sin match bit for bit
            idx = torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float()
            f = self._inv_freq[device] = 1.0 / (self.base ** (idx / self.dim))
        return f

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions [B, S] -> (cos, sin) [B, 1, S, rotary_dim] in `dtype`, or None without rope."""
        if self.dim == 0:
            return None
        freqs = positions[..., None].float() * self.inv_freq(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, rope) -> torch.Tensor:
    """x [B, H, S, D]; rotates x[..., :rotary_dim] and passes the rest through (rotary_percentage < 1)."""
    if rope is None:
        return x
    cos, sin = rope
    r = cos.shape[-1]
    rot, rest = (x, None) if r == x.shape[-1] else (x[..., :r], x[..., r:])
    rotated = torch.cat((-rot[..., r // 2 :], rot[..., : r // 2]), dim=-1)
    rot = rot * cos + rotated * sin
    return rot if rest is None else torch.cat((rot, rest), dim=-1)


class SelfAttention(nn.Module):
    """Fused QKV. Row layout of query_key_value (Megatron): per query group
    [heads_per_group query heads, one key head, one value head], each head_dim rows.
    With one group per head (GPT-2B) that is the per-head [q, k, v] interleave."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_groups, self.d = cfg.num_attention_heads, cfg.query_groups, cfg.head_dim
        if self.n_heads % self.n_groups:
            raise ValueError("num_attention_heads must be a multiple of num_query_groups")
        self.hpg = self.n_heads // self.n_groups
        h = cfg.hidden_size
        self.query_key_value = nn.Linear(h, (self.n_heads + 2 * self.n_groups) * self.d, bias=cfg.bias)
        self.dense = nn.Linear(self.n_heads * self.d, h, bias=cfg.bias)
        self.dropout_p = cfg.attention_dropout

    def forward(self, x, rope, attn_mask=None, cache=None, layer_idx: int = 0):
        """attn_mask: None = causal (right padding needs none: real tokens never see later pads);
        else a bool [B, 1, S, T] (True = attend). cache: a KV cache (see generation.KVCache)."""
        b, s, _ = x.shape
        qkv = self.query_key_value(x).view(b, s, self.n_groups, self.hpg + 2, self.d)
        q = qkv[:, :, :, : self.hpg].reshape(b, s, self.n_heads, self.d).transpose(1, 2)
        k = qkv[:, :, :, self.hpg].transpose(1, 2)
        v = qkv[:, :, :, self.hpg + 1].transpose(1, 2)
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        if cache is not None:
            k, v, attn_mask = cache.update(layer_idx, k, v)
        gqa = self.n_groups != self.n_heads
        if gqa and not _SDPA_GQA:
            k, v = k.repeat_interleave(self.hpg, dim=1), v.repeat_interleave(self.hpg, dim=1)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=attn_mask is None and s > 1, **({"enable_gqa": True} if gqa and _SDPA_GQA else {}))
        return self.dense(o.transpose(1, 2).reshape(b, s, self.n_heads * self.d))


class MLP(nn.Module):
    """fast-swiglu / swiglu: one fused fc1 of 2*ffn rows, silu(first half) * second half.
    gelu: fc1 of ffn rows. (Both swiglu spellings compute the same; the state-dict adapter
    splits/joins NeMo's unfused `dense_h_to_4h_2` for `swiglu`.)"""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.glu = cfg.activation in ("fast-swiglu", "swiglu")
        if not self.glu and cfg.activation != "gelu":
            raise ValueError(f"activation={cfg.activation!r}: expected fast-swiglu | swiglu | gelu")
        h, f = cfg.hidden_size, cfg.ffn_hidden_size
        self.dense_h_to_4h = nn.Linear(h, 2 * f if self.glu else f, bias=cfg.bias)
        self.dense_4h_to_h = nn.Linear(f, h, bias=cfg.bias)

    def forward(self, x):
        y = self.dense_h_to_4h(x)
        if self.glu:
            a, g = y.chunk(2, dim=-1)
            y = F.silu(a) * g
        else:
            y = F.gelu(y)
        return self.dense_4h_to_h(y)


class TransformerLayer(nn.Module):
    """Pre-LN block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = Norm(cfg)
        self.self_attention = SelfAttention(cfg)
        self.post_attention_layernorm = Norm(cfg)
        self.mlp = MLP(cfg)
        self.hidden_dropout = cfg.hidden_dropout

    def forward(self, x, rope, attn_mask=None, cache=None, layer_idx: int = 0):
        a = self.self_attention(self.input_layernorm(x), rope, attn_mask, cache, layer_idx)
        x = x + F.dropout(a, self.hidden_dropout, self.training)
        m = self.mlp(self.post_attention_layernorm(x))
        return x + F.dropout(m, self.hidden_dropout, self.training)


def init_weights(module: nn.Module, cfg: ModelConfig) -> None:
    """Megatron init: normal(0, std) everywhere, output projections scaled by 1/sqrt(2 * layers)."""
    std = cfg.init_method_std
    out_std = std / math.sqrt(2.0 * cfg.num_layers) if cfg.use_scaled_init_method else std
    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            s = out_std if name.endswith(("self_attention.dense", "mlp.dense_4h_to_h")) else std
            nn.init.normal_(m.weight, 0.0, s)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, Norm):
            m.reset_parameters()
