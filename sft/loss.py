"""The SFT loss: mean negative log-likelihood of the target tokens.

`token_nll` is the per-token cross-entropy in fp32; `batch_nll_sum` runs the model on a padded or
packed micro-batch and returns the sum over its target tokens (the LM head runs on those positions
only: the vocab projection is the largest activation, prompts need none). The trainer divides by the
target tokens of the whole global batch, so the loss is one token mean however the batch is cut.
"""
from __future__ import annotations

from typing import Tuple

import torch


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N, V] logits, [N] targets -> [N] -log softmax(logits)[target], in fp32."""
    logits = logits.float()
    return torch.logsumexp(logits, -1) - logits.gather(-1, targets[:, None]).squeeze(-1)


def batch_nll_sum(model, input_ids: torch.Tensor, target_mask: torch.Tensor,
                  documents=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum of target-token NLL, number of target tokens) of one micro-batch.

    target_mask [B, S-1]: column t = 1 where token t+1 is a target (see sft.data)."""
    h = model.hidden_states(input_ids, documents=documents)[:, :-1]
    sel = target_mask.bool()
    logits = model.logits(h[sel])
    nll = token_nll(logits, input_ids[:, 1:][sel])
    return nll.sum(), sel.sum()


def perplexity(mean_nll: float) -> float:
    import math

    return math.exp(min(mean_nll, 50.0))

