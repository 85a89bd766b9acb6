"""Rollouts: generate responses with the KV-cache generator, then score them in forward passes
(policy and reference log-probs, critic values, reward-model score).

A rollout batch keeps every sequence right-padded in one [B, S] tensor; per-token tensors are
[B, S - 1] (column t = the action that emits token t + 1, see ppo.algorithms), with `mask` 1 on the
response tokens (an end token, when sampled, included: it is an action too).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from modeling import generate


@dataclass
class RolloutBatch:
    tokens: torch.Tensor  # [B, S] prompt + response, then pad
    lengths: torch.Tensor  # [B] prompt + response
    prompt_lengths: torch.Tensor  # [B]
    mask: torch.Tensor  # [B, S-1] float, response actions
    logprobs: Optional[torch.Tensor] = None  # [B, S-1] policy at rollout time
    ref_logprobs: Optional[torch.Tensor] = None  # [B, S-1] initial policy
    values: Optional[torch.Tensor] = None  # [B, S-1] critic at rollout time
    scores: Optional[torch.Tensor] = None  # [B] reward model (raw)
    rewards: Optional[torch.Tensor] = None  # [B] after reward standardization
    advantages: Optional[torch.Tensor] = None  # [B, S-1]
    returns: Optional[torch.Tensor] = None  # [B, S-1]
    ended: Optional[torch.Tensor] = None  # [B] bool: stopped at an end token/string (else cut at max_length)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, idx) -> "RolloutBatch":
        """Rows `idx`, columns trimmed to their longest sequence."""
        idx = torch.as_tensor(idx, device=self.tokens.device)
        s = int(self.lengths[idx].max())
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                out[f.name] = None
            elif v.dim() == 1:
                out[f.name] = v[idx]
            else:
                out[f.name] = v[idx, : s if f.name == "tokens" else s - 1]
        return RolloutBatch(**out)

    def to(self, device) -> "RolloutBatch":
        return RolloutBatch(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to(device))
                               for f in fields(self)})


def pad_sequences(seqs: Sequence[torch.Tensor], pad_id: int, device) -> torch.Tensor:
    s = max(len(x) for x in seqs)
    out = torch.full((len(seqs), s), pad_id, dtype=torch.long, device=device)
    for i, x in enumerate(seqs):
        out[i, : len(x)] = x
    return out


def response_mask(prompt_lengths: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] with 1 at columns plen-1 .. len-2 (the actions that emitted the response)."""
    cols = torch.arange(width, device=lengths.device)[None]
    return ((cols >= prompt_lengths[:, None] - 1) & (cols < lengths[:, None] - 1)).float()


def micro_batches(n: int, size: int) -> Iterator[List[int]]:
    for i in range(0, n, size):
        yield list(range(i, min(n, i + size)))


# what ends a response: shared with stage=eval (modeling/ends.py)
from modeling.ends import EndCondition, default_end_strings, unescape  # noqa: E402,F401


def generate_responses(actor, prompts: List[List[int]], *, micro_batch_size: int, sampling, length,
                       end: EndCondition, eos_id: int, pad_id: int, generator: torch.Generator,
                       greedy: Optional[bool] = None) -> RolloutBatch:
    """Sample one response per prompt, `micro_batch_size` prompts per generate() call."""
    dev = next(actor.parameters()).device
    seqs, plens, lens, ended = [], [], [], []
    for mb in micro_batches(len(prompts), micro_batch_size):
        out = generate(actor, [prompts[i] for i in mb], max_length=length.max_length, min_length=length.min_length,
                       temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                       greedy=sampling.use_greedy if greedy is None else greedy, end_token_ids=end.token_ids,
                       eos_id=eos_id, end_strings=end.strings, detokenize=end.detokenize, pad_id=pad_id,
                       generator=generator)
        for row, ln in zip(out.tokens, out.lengths.tolist()):
            seqs.append(row[:ln])
        plens.append(out.prompt_lengths)
        lens.append(out.lengths)
        ended.append(out.ended)
    tokens = pad_sequences(seqs, pad_id, dev)
    lengths, plen = torch.cat(lens), torch.cat(plens)
    return RolloutBatch(tokens, lengths, plen, response_mask(plen, lengths, tokens.shape[1] - 1), ended=torch.cat(ended))


# --- forward passes --------------------------------------------------------------------------

def token_logprobs(model, tokens: torch.Tensor, mask: torch.Tensor, with_entropy: bool = False,
                   chunk_tokens: int = 1024):
    """log pi(token t+1 | ..t) on the masked columns ([B, S-1], 0 elsewhere), and the entropy of
    the policy there when asked. The LM head runs on the masked positions only: the vocab
    projection is the largest activation (GPT-2B: 256k logits per token), prompts need none.
    Without autograd it runs `chunk_tokens` positions at a time, bounding the fp32 logits."""
    h = model.hidden_states(tokens)[:, :-1]
    sel = mask.bool()
    hs, targets = h[sel], tokens[:, 1:][sel]
    step = hs.shape[0] if torch.is_grad_enabled() else max(1, chunk_tokens)
    lps, ents = [], []
    for i in range(0, max(hs.shape[0], 1), step):
        logits = model.logits(hs[i:i + step]).float()
        lse = torch.logsumexp(logits, -1)
        lps.append(logits.gather(1, targets[i:i + step, None]).squeeze(1) - lse)
        if with_entropy:
            probs = (logits - lse[:, None]).exp()
            # masked (padded-vocab) logits are -inf with probability 0: their p * logit term must be 0,
            # not nan, in the forward and in the backward (hence a finite stand-in, not torch.where)
            finite = logits.masked_fill(torch.isinf(logits), 0.0)
            ents.append(lse - (probs * finite).sum(-1))
        del logits
    lp = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(sel, torch.cat(lps))
    if not with_entropy:
        return lp, None
    ent = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(sel, torch.cat(ents))
    return lp, ent


def token_values(critic, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """V(state t) for each action column t, 0 outside the mask."""
    return critic(tokens)[:, :-1] * mask


@torch.no_grad()
def score(batch: RolloutBatch, *, actor, reference, critic, reward, micro_batch_size: int,
          standardize=None, missing_eos_penalty: Optional[float] = None, timers: Optional[Dict[str, float]] = None, sync=lambda: None) -> RolloutBatch:
    """Fill logprobs, ref_logprobs, values, scores and rewards, `micro_batch_size` rows at a time
    (each micro-batch trimmed to its longest sequence)."""
    n, width = len(batch), batch.mask.shape[1]
    dev = batch.tokens.device
    lp = torch.zeros(n, width, device=dev)
    ref, val = torch.zeros_like(lp), torch.zeros_like(lp)
    scores = torch.zeros(n, device=dev)
    modes = [(m, m.training) for m in (actor, critic) if m is not None]
    for m, _ in modes:
        m.eval()
    t0 = time.perf_counter()
    try:
        for mb in micro_batches(n, micro_batch_size):
            sub = batch.select(mb)
            s = sub.mask.shape[1]
            lp[mb, :s] = token_logprobs(actor, sub.tokens, sub.mask)[0]
            ref[mb, :s] = token_logprobs(reference, sub.tokens, sub.mask)[0]
            if critic is not None:  # grpo / rloo: no critic, values stay 0 (unused)
                val[mb, :s] = token_values(critic, sub.tokens, sub.mask)
            scores[mb] = reward(sub.tokens, lengths=sub.lengths).float()
    finally:
        for m, was in modes:
            m.train(was)
    sync()
    if timers is not None:
        timers["scoring"] = timers.get("scoring", 0.0) + time.perf_counter() - t0
    batch.logprobs, batch.ref_logprobs, batch.values, batch.scores = lp, ref, val, scores
    rewards = scores
    if standardize is not None and standardize.enable:
        rewards = (scores - standardize.mean) / standardize.std
    if missing_eos_penalty and batch.ended is not None:
        # TRL's missing_eos_penalty: a response cut at max_length (no end token or end string) loses this
        # much reward, so a reward model that pays for length cannot be gamed by never stopping
        rewards = rewards - float(missing_eos_penalty) * (~batch.ended).to(rewards.dtype)
    batch.rewards = rewards
    return batch
