"""Reward model (scalar at the last real token) and value model (a value per token, the PPO critic).

Both are GPTModel subclasses that add `rm_head` (Linear(hidden, 1) with bias), so their state dicts
are the backbone's keys plus `rm_head.weight` / `rm_head.bias`; in a `.nemo` they are
`model.rm_head.weight` / `model.rm_head.bias`, the names NeMo-Aligner uses for both its reward model
and its critic (the critic sets `output_sequence: true` in model_config.yaml, as here). That lets
the rm stage hand its `.nemo` to the ppo stage, which loads it as a ValueModel for the critic.

They are built without the LM head (the 256k x 2048 output layer is 0.5e9 parameters nobody reads);
a causal-LM checkpoint loads into them with its output layer dropped.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from .config import ModelConfig
from .model import GPTModel


def last_token_index(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                     lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Index of each row's last real token: lengths - 1, else the last position with mask 1
    (right or left padding), else the last position."""
    b, s = input_ids.shape
    if lengths is not None:
        return lengths.to(input_ids.device).long().clamp(min=1) - 1
    if attention_mask is not None:
        pos = torch.arange(s, device=input_ids.device).expand(b, s)
        return torch.where(attention_mask.bool(), pos, torch.zeros_like(pos)).amax(dim=1)
    return torch.full((b,), s - 1, dtype=torch.long, device=input_ids.device)


class _HeadModel(GPTModel):
    output_sequence = False

    def __init__(self, cfg: ModelConfig, vocab_size: int, with_lm_head: bool = False):
        super().__init__(cfg, vocab_size, with_lm_head)
        self.rm_head = nn.Linear(cfg.hidden_size, 1, bias=True)
        nn.init.normal_(self.rm_head.weight, 0.0, cfg.init_method_std)
        nn.init.zeros_(self.rm_head.bias)

    def _scores(self, input_ids, attention_mask=None, position_ids=None, documents=None) -> torch.Tensor:
        h = self.hidden_states(input_ids, attention_mask, position_ids, documents=documents)
        if documents is not None:  # packed: only each document's last token is read
            h = h.reshape(-1, h.shape[-1])[documents.ends]
        # the head runs in fp32: rewards/values feed losses and advantages, where bf16's 8 bits hurt
        return nn.functional.linear(h.float(), self.rm_head.weight.float(), self.rm_head.bias.float()).squeeze(-1)

    def lm_logits(self, input_ids, attention_mask=None, position_ids=None):
        return GPTModel.forward(self, input_ids, attention_mask, position_ids)


class RewardModel(_HeadModel):
    """forward(input_ids, attention_mask=None, lengths=None, position_ids=None) -> rewards [B] (fp32),
    read at each row's last real token (see last_token_index).

    Packed: forward(input_ids, documents=PackedDocuments) -> rewards [M] (fp32), one per real
    document, read at its last token (documents.ends), in packing order."""

    def forward(self, input_ids, attention_mask=None, lengths=None, position_ids=None, documents=None):
        # the rewards are returned as tensors of their own, not views (FSDP2 warns about a root module
        # returning a view: an in-place op on it would skip its backward hook)
        if documents is not None:
            return self._scores(input_ids, None, position_ids, documents).clone()
        scores = self._scores(input_ids, attention_mask, position_ids)
        idx = last_token_index(input_ids, attention_mask, lengths)
        return scores[torch.arange(scores.shape[0], device=scores.device), idx]


class ValueModel(_HeadModel):
    """The PPO critic: forward(input_ids, attention_mask=None, position_ids=None) -> values [B, S] (fp32),
    one per position (values at pad positions are meaningless; mask them)."""

    output_sequence = True

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self._scores(input_ids, attention_mask, position_ids)


def attach_head(model: GPTModel, cls: type, keep_lm_head: bool = False) -> "_HeadModel":
    """Wrap an already-built GPTModel's weights in a head model (fresh head). The parameters are
    shared, not copied."""
    out = cls.__new__(cls)
    nn.Module.__init__(out)
    out.config, out.vocab_size, out._compiled_layers = model.config, model.vocab_size, None
    out.with_lm_head = keep_lm_head and model.with_lm_head
    lm = copy.copy(model.language_model)  # shallow: same parameters, own module table
    lm._modules = dict(lm._modules)
    if not out.with_lm_head:
        lm.output_layer = None
    out.language_model = lm
    p = next(model.parameters())
    out.rm_head = nn.Linear(model.config.hidden_size, 1, bias=True, device=p.device, dtype=p.dtype)
    nn.init.normal_(out.rm_head.weight, 0.0, model.config.init_method_std)
    nn.init.zeros_(out.rm_head.bias)
    return out
