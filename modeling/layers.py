"""Transformer building blocks. Module and parameter names follow legacy Megatron (NeMo
`mcore_gpt: false`) so a `.nemo` state dict maps onto them by adding the `model.` prefix.

One code path serves both families; `ModelConfig` picks the variant:
  GPT-2B-001: layernorm1p, rotary on half of each head, fused fast-swiglu, no linear biases.
  Llama:      rmsnorm, grouped-query attention, full rotary, (fast-)swiglu, no biases.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

# enable_gqa lets SDPA broadcast K/V heads itself (no repeat_interleave copy); torch >= 2.5.
_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class PackedDocuments(NamedTuple):
    """Several documents packed end to end into the rows of a [B, S] batch (sequence packing).
    Attention is causal inside each document and never crosses into another; position ids restart
    at 0 for each document (`document_positions`). Build it with `pack_documents`.

    cu_seqlens  int32 [N+1]: document starts in the flattened B*S token axis, ending at B*S (every
                token belongs to a document: a row's padded tail is a document of its own, so no
                position is left unwritten)
    max_len     the longest document, rounded up to a power of two (the varlen kernel's grid)
    doc_ids     int32 [B, S]: each token's document number (the mask and flex backends)
    ends        int64 [M]: flattened index of the last token of each real document, in order
    backend     varlen (flash varlen kernel, CUDA) | flex (FlexAttention) | mask (SDPA with an
                explicit block-diagonal causal mask: exact everywhere, O(S^2) memory: CPU and tests)
    block_mask  the backend's precomputed mask (flex BlockMask, or bool [B, 1, S, S] for mask)
    """
    cu_seqlens: torch.Tensor
    max_len: int
    doc_ids: torch.Tensor
    ends: torch.Tensor
    backend: str
    block_mask: Any = None


def _varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, {}
    params = inspect.signature(varlen_attn).parameters
    # torch 2.10/2.11 spell causality `is_causal`; 2.12+ spell it `window_size=(-1, 0)`
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    return varlen_attn, dict(causal=causal, gqa="enable_gqa" in params)


_VARLEN_ATTN, _VARLEN_ARGS = _varlen()
_FLEX_COMPILED = None


def _flex_attention(device: torch.device):
    """flex_attention, compiled once on CUDA (eager flex materialises the scores; inside an
    already compiled layer the compiled wrapper is traced through). Eager on CPU (tests)."""
    global _FLEX_COMPILED
    from torch.nn.attention.flex_attention import flex_attention
    if device.type != "cuda":
        return flex_attention
    if _FLEX_COMPILED is None:
        _FLEX_COMPILED = torch.compile(flex_attention)
    return _FLEX_COMPILED


def pack_documents(lengths: torch.Tensor, shape, backend: str = "auto", device=None,
                   real: Optional[int] = None) -> PackedDocuments:
    """Documents of `lengths` (int [N], in order) laid end to end over a [B, S] batch (`shape`;
    sum(lengths) == B*S: include each row's padded tail as a document). The first `real`
    documents (default all) get an entry in `ends`. backend: auto = varlen on CUDA when this torch
    has it, else mask. flex runs its blocks eagerly (GPTModel skips the compiled blocks for it):
    inside a torch.compile'd block its document mask came out wrong (CPU, torch 2.13)."""
    b, s = shape
    device = torch.device(device) if device is not None else lengths.device
    lengths = lengths.detach().to("cpu", torch.int64)  # host-side bookkeeping: no device syncs
    if int(lengths.sum()) != b * s:
        raise ValueError(f"document lengths sum to {int(lengths.sum())}, batch holds {b}x{s} tokens")
    if backend == "auto":
        backend = "varlen" if device.type == "cuda" and _VARLEN_ATTN is not None else "mask"
    if backend not in ("varlen", "flex", "mask"):
        raise ValueError(f"packed attention backend={backend!r}: expected auto | varlen | flex | mask")
    if backend == "varlen" and _VARLEN_ATTN is None:
        raise ValueError("this torch has no torch.nn.attention.varlen (needs torch >= 2.10)")
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    n = len(lengths) if real is None else int(real)
    ends = cu[1: n + 1].long() - 1
    doc = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), lengths).view(b, s)
    longest = int(lengths.max())
    nb = device.type == "cuda"
    cu, ends, doc = (t.to(device, non_blocking=nb) for t in (cu, ends, doc))
    max_len = 1 << max(7, (longest - 1).bit_length())  # few distinct values: few recompiles
    block = None
    if backend == "mask":
        pos = torch.arange(s, device=device)
        block = ((doc[:, :, None] == doc[:, None, :]) & (pos[:, None] >= pos[None, :])[None])[:, None]
    elif backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document_causal(bi, h, q, kv):
            return (doc[bi, q] == doc[bi, kv]) & (q >= kv)
        block = create_block_mask(same_document_causal, b, None, s, s, device=device, _compile=device.type == "cuda")
    return PackedDocuments(cu, max_len, doc, ends, backend, block)


def document_positions(docs: PackedDocuments) -> torch.Tensor:
    """[B, S] position ids that restart at 0 at each document's first token."""
    b, s = docs.doc_ids.shape
    flat = torch.arange(b * s, device=docs.doc_ids.device)
    starts = docs.cu_seqlens[:-1].long()[docs.doc_ids.reshape(-1).long()]
    return (flat - starts).view(b, s)


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
    # computed in cos/sin's precision (fp32 under autocast), returned in x's: bf16 q/k stay bf16 for
    # the attention kernel (the same rounding autocast's SDPA would apply, half the memory traffic)
    return (rot if rest is None else torch.cat((rot.to(x.dtype), rest), dim=-1)).to(x.dtype)


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
        a bool [B, 1, S, T] (True = attend); or PackedDocuments (sequence packing).
        cache: a KV cache (see generation.KVCache)."""
        if isinstance(attn_mask, PackedDocuments) and attn_mask.backend != "mask":
            return self._packed(x, rope, attn_mask)
        if isinstance(attn_mask, PackedDocuments):
            attn_mask = attn_mask.block_mask
        b, s, _ = x.shape
        q, k, v = self._qkv(x, rope)
        if cache is not None:
            k, v, attn_mask = cache.update(layer_idx, k, v)
        gqa = self.n_groups != self.n_heads
        if gqa and not _SDPA_GQA:
            k, v = k.repeat_interleave(self.hpg, dim=1), v.repeat_interleave(self.hpg, dim=1)
        # without a mask the keys are exactly these s positions (a prefill returns none), so causal is
        # right for every s (s == 1 included). Not `and s > 1`: under dynamic shapes that is a SymBool,
        # SDPA refuses it and torch.compile broke every block into three graphs around the attention
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=attn_mask is None, **({"enable_gqa": True} if gqa and _SDPA_GQA else {}))
        return self.dense(o.transpose(1, 2).reshape(b, s, self.n_heads * self.d))

    def _qkv(self, x, rope):
        """[B, S, H] -> q [B, heads, S, d], k and v [B, groups, S, d], rotary applied to q and k.
        The fused projection is laid out per group: its query heads, then one key, then one value."""
        b, s, _ = x.shape
        qkv = self.query_key_value(x).view(b, s, self.n_groups, self.hpg + 2, self.d)
        q = qkv[:, :, :, : self.hpg].reshape(b, s, self.n_heads, self.d).transpose(1, 2)
        k = qkv[:, :, :, self.hpg].transpose(1, 2)
        v = qkv[:, :, :, self.hpg + 1].transpose(1, 2)
        return apply_rotary(q, rope), apply_rotary(k, rope), v

    def _packed(self, x, rope, docs: PackedDocuments):
        """Block-diagonal causal attention over packed documents: varlen (flash, [tokens, heads, dim]
        layout) or flex (a document-id BlockMask)."""
        if self.training and self.dropout_p > 0:
            raise NotImplementedError("attention dropout with sequence packing")
        b, s, _ = x.shape
        q, k, v = self._qkv(x, rope)
        gqa = self.n_groups != self.n_heads
        if docs.backend == "flex":
            o = _flex_attention(q.device)(q, k, v, block_mask=docs.block_mask, enable_gqa=gqa)
            return self.dense(o.transpose(1, 2).reshape(b, s, self.n_heads * self.d))
        if gqa and not _VARLEN_ARGS["gqa"]:
            k, v = k.repeat_interleave(self.hpg, dim=1), v.repeat_interleave(self.hpg, dim=1)
        t = b * s
        # the flash kernel takes fp16/bf16 only, and autocast does not reach this op (SDPA is on
        # autocast's list, varlen_attn is not): cast as autocast would (rope made q/k fp32)
        dt = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else q.dtype
        q, k, v = (y.transpose(1, 2).reshape(t, y.shape[1], self.d).to(dt) for y in (q, k, v))
        extra = {"enable_gqa": True} if gqa and _VARLEN_ARGS["gqa"] else {}
        o = _VARLEN_ATTN(q, k, v, docs.cu_seqlens, docs.cu_seqlens, docs.max_len, docs.max_len,
                         **_VARLEN_ARGS["causal"], **extra)
        return self.dense(o.reshape(b, s, self.n_heads * self.d))


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
