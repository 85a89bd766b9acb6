"""The decoder-only transformer (GPT-2B-001 and the Llama family by config), its builder and a
FLOPs counter for MFU reports.

State-dict keys are legacy Megatron names without NeMo's leading `model.`:
`language_model.embedding.word_embeddings.weight`, `language_model.encoder.layers.{i}...`,
`language_model.encoder.final_layernorm.*`, `language_model.output_layer.weight` (absent when tied).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .layers import Norm, PackedDocuments, Rotary, TransformerLayer, document_positions, init_weights


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, cfg.hidden_size)


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.num_layers))
        self.final_layernorm = Norm(cfg)


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab: int, with_lm_head: bool):
        super().__init__()
        self.embedding = Embedding(cfg, vocab)
        self.rotary_pos_emb = Rotary(cfg)
        self.encoder = Encoder(cfg)
        untied = with_lm_head and not cfg.share_embeddings_and_output_weights
        self.output_layer = nn.Linear(cfg.hidden_size, vocab, bias=False) if untied else None


def padding_attention_mask(attention_mask: torch.Tensor) -> Optional[torch.Tensor]:
    """[B, S] 0/1 mask -> None when every row is right-padded (causal attention alone is exact for
    the real tokens, and lets SDPA pick its flash kernel), else a bool [B, 1, S, S] causal+padding
    mask in which every query also sees itself (so pad rows never hold an all-False row -> no NaN)."""
    m = attention_mask.bool()
    if bool((m[:, 1:] <= m[:, :-1]).all()):
        return None
    s = m.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=m.device).tril()
    allowed = causal[None] & m[:, None, :]
    allowed |= torch.eye(s, dtype=torch.bool, device=m.device)[None]
    return allowed[:, None]


class GPTModel(nn.Module):
    """forward(input_ids [B, S], attention_mask=None, position_ids=None) -> logits [B, S, V].

    Right-padded batches need no mask (causal attention never lets a real token see a later pad);
    a left-padded or gappy `attention_mask` switches to an explicit mask and, unless given,
    position ids that count real tokens only. Logits come in the parameters' dtype.

    `documents` (a `layers.PackedDocuments`, see `layers.pack_documents`): the rows hold several
    documents end to end (sequence packing); each attends causally to itself only, and its
    position ids restart at 0 (unless `position_ids` are given).
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, with_lm_head: bool = True):
        super().__init__()
        self.config = cfg
        self.vocab_size = vocab_size
        self.with_lm_head = with_lm_head
        self.language_model = LanguageModel(cfg, vocab_size, with_lm_head)
        self._compiled_layers: Optional[list] = None

    # --- forward ---
    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache=None,
                      documents: Optional[PackedDocuments] = None):
        """Final-norm hidden states [B, S, H] (what the reward / value heads read)."""
        lm = self.language_model
        x = lm.embedding.word_embeddings(input_ids)
        attn_mask = None
        if documents is not None:
            if cache is not None or attention_mask is not None:
                raise ValueError("packed documents take neither a KV cache nor an attention_mask")
            attn_mask = documents
            if position_ids is None:
                position_ids = document_positions(documents)
        elif cache is not None:
            position_ids = cache.positions(input_ids)
        elif attention_mask is not None:
            attn_mask = padding_attention_mask(attention_mask)
            if position_ids is None and attn_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        rope = lm.rotary_pos_emb(position_ids, x.dtype)
        # flex: a compiled block mis-applied the closure-captured document mask (CPU, torch 2.13), so
        # its blocks run eagerly (flex_attention itself is still compiled, see layers._flex_attention)
        eager = cache is not None or (documents is not None and documents.backend == "flex")
        layers = lm.encoder.layers if eager else self._layer_fns()
        ckpt = self.config.activations_checkpointing and self.training and torch.is_grad_enabled()
        # AOTAutograd's partitioner reads the activation memory budget when a block (re)compiles:
        # patched for this pass, not set process-wide, so models of one process keep their own
        budget = self.config.activation_memory_budget
        patch = torch._functorch.config.patch(activation_memory_budget=budget) if not eager and budget < 1.0 \
            and self.config.torch_compile else contextlib.nullcontext()
        with patch:
            for i, layer in enumerate(layers):
                if ckpt:
                    x = checkpoint(layer, x, rope, attn_mask, use_reentrant=False)
                else:
                    x = layer(x, rope, attn_mask, cache, i)
        return lm.encoder.final_layernorm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        lm = self.language_model
        if lm.output_layer is not None:
            return lm.output_layer(hidden)
        if not self.with_lm_head:
            raise RuntimeError("this model was built without an LM head (reward/value backbone)")
        return hidden @ lm.embedding.word_embeddings.weight.t()

    def forward(self, input_ids, attention_mask=None, position_ids=None, return_hidden: bool = False, cache=None):
        h = self.hidden_states(input_ids, attention_mask, position_ids, cache)
        return h if return_hidden else self.logits(h)

    def _layer_fns(self):
        """With config.torch_compile, each block is compiled once (all blocks share the code, so
        one compiled graph serves all 24 and compile time stays small). Generation keeps the eager
        blocks: its decode step is captured as a CUDA graph instead."""
        if not self.config.torch_compile:
            return self.language_model.encoder.layers
        if self._compiled_layers is None:
            # one block's code serves every layer, training and no-grad passes and the varying
            # lengths of rollouts: past dynamo's default of 8 guarded variants it would silently run
            # the block eagerly (seen in PPO: "hit config.recompile_limit (8) ... grad_mode")
            for knob in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
            self._compiled_layers = [torch.compile(layer) for layer in self.language_model.encoder.layers]
        return self._compiled_layers

    # --- bookkeeping ---
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.language_model.embedding.word_embeddings.weight.numel()
        return n


def build_model(cfg: ModelConfig, vocab_size: Optional[int] = None, *, device=None, dtype=None,
                with_lm_head: bool = True, init: bool = True) -> GPTModel:
    """Random init from config. The vocab (`vocab_size` argument, else cfg.vocab_size) is padded to
    make_vocab_size_divisible_by * tp, as Megatron does. device="meta" builds without memory."""
    cfg = dataclasses.replace(cfg)  # the model owns its copy (runtime switches get flipped on it)
    vocab = cfg.padded_vocab_size(vocab_size)
    with torch.device(device or "cpu"):
        model = GPTModel(cfg, vocab, with_lm_head)
    if dtype is not None:
        model.to(dtype)
    if init and str(device) != "meta":
        init_weights(model, cfg)
    return model


def compute_dtype(cfg: ModelConfig, device) -> torch.dtype:
    """The dtype to run in: bf16 on CUDA when precision says bf16 (16 / bf16-mixed too), else fp32
    (the CPU path always computes in fp32, as the config documents)."""
    bf16 = str(cfg.precision) in ("bf16", "16", "bf16-mixed")
    return torch.bfloat16 if bf16 and torch.device(device).type == "cuda" else torch.float32


def flops_per_token(cfg: ModelConfig, seq_len: int, vocab_size: Optional[int] = None,
                    lm_head: bool = True, training: bool = True) -> float:
    """Model FLOPs per token (PaLM / Megatron convention, no activation recompute counted):
    2 * matmul params (+ the LM head when `lm_head`) + 2 * 2 * layers * seq * head_dim * heads for
    QK^T and AV (full, not halved for causality), times 3 for training (fwd + bwd)."""
    h, f, L = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers
    qkv = h * (cfg.num_attention_heads + 2 * cfg.query_groups) * cfg.head_dim
    proj = cfg.num_attention_heads * cfg.head_dim * h
    mlp = h * f * (3 if cfg.activation in ("fast-swiglu", "swiglu") else 2)
    matmul = L * (qkv + proj + mlp)
    if lm_head:
        matmul += h * cfg.padded_vocab_size(vocab_size)
    attn = 4 * L * seq_len * cfg.num_attention_heads * cfg.head_dim
    fwd = 2 * matmul + attn
    return float(3 * fwd if training else fwd)
