"""Batched sampling with a static KV cache (CPU and GPU; on CUDA each decode step is a CUDA graph).

Prompts of different lengths are right-padded; each row keeps its own write position, so a row's
generated tokens follow its prompt directly (no left padding, natural position ids). Pad garbage
that prefill writes past a row's prompt is overwritten before any query can see it, because a
decode query attends only to keys at positions <= its own.

Lengths follow NeMo's length_params: `max_length` / `min_length` count generated tokens; end
tokens are suppressed until `min_length` tokens exist. An end token, when sampled, is kept in the
output and counted in `lengths`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch

from .model import GPTModel

_BUCKET = 128  # decode attends to the cache prefix rounded up to this, one CUDA graph per bucket


class KVCache:
    """Static per-layer K/V [layers, B, kv_heads, max_len, head_dim]. `mode` is "prefill" (write
    positions 0..S-1, causal attention over the new keys) or "decode" (one token per row at `pos`)."""

    def __init__(self, model: GPTModel, batch: int, max_len: int, dtype, device):
        c = model.config
        shape = (c.num_layers, batch, c.query_groups, max_len, c.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.arange = torch.arange(max_len, device=device)
        self.mode, self.attend_len, self.mask = "prefill", max_len, None

    def positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.mode == "prefill":
            return torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        keys = self.arange[: self.attend_len]
        self.mask = (keys[None] <= self.pos[:, None])[:, None, None, :]
        return self.pos[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.mode == "prefill":
            s = k.shape[2]
            self.k[layer, :, :, :s] = k
            self.v[layer, :, :, :s] = v
            return k, v, None
        idx = self.pos.view(-1, 1, 1, 1).expand(-1, k.shape[1], 1, k.shape[3])
        self.k[layer].scatter_(2, idx, k)
        self.v[layer].scatter_(2, idx, v)
        n = self.attend_len
        return self.k[layer, :, :, :n], self.v[layer, :, :, :n], self.mask


@dataclass
class GenerationOutput:
    tokens: torch.Tensor  # [B, max_prompt + max_length]: prompt, then generated tokens, then pad_id
    lengths: torch.Tensor  # [B] prompt + generated
    prompt_lengths: torch.Tensor  # [B]
    logprobs: Optional[torch.Tensor] = None  # [B, same as tokens]: log p(token) under the raw logits, 0 elsewhere
    ended: Optional[torch.Tensor] = None  # [B] bool: the row stopped at an end token or end string (not max_length)


def pad_prompts(prompts, lengths=None, pad_id: int = 0, device=None):
    if isinstance(prompts, torch.Tensor):
        p = prompts.to(device)
        ln = torch.full((p.shape[0],), p.shape[1]) if lengths is None else torch.as_tensor(lengths)
        return p, ln.to(device=p.device, dtype=torch.long)
    ln = torch.tensor([len(x) for x in prompts], dtype=torch.long)
    if (ln == 0).any():
        raise ValueError("empty prompt: every prompt needs at least one token")
    out = torch.full((len(prompts), int(ln.max())), pad_id, dtype=torch.long)
    for i, x in enumerate(prompts):
        out[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
    return out.to(device), ln.to(device)


def sample_next(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, greedy=False, generator=None):
    """logits [B, V] fp32 -> token ids [B]."""
    if greedy:
        return logits.argmax(-1)
    logits = logits / max(temperature, 1e-6)
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


class _DecodeStep:
    """model(one token per row) -> fp32 logits [B, V]; on CUDA replayed from a graph per bucket."""

    def __init__(self, model: GPTModel, cache: KVCache, batch: int, use_graph: bool):
        self.model, self.cache, self.use_graph = model, cache, use_graph
        dev = cache.k.device
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.graphs: dict = {}

    def _run(self):
        h = self.model.hidden_states(self.tok, cache=self.cache)
        return self.model.logits(h[:, -1]).float()

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor, attend_len: int) -> torch.Tensor:
        self.tok.copy_(tokens[:, None])
        self.cache.pos.copy_(pos)
        self.cache.mode, self.cache.attend_len = "decode", attend_len
        if not self.use_graph:
            return self._run()
        if attend_len not in self.graphs:
            # warm up on a side stream (allocator, cuBLAS handles), then capture
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                self._run()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = self._run()
            self.graphs[attend_len] = (g, out)
            # capture recorded but did not run the step's scatter; replay below runs it once
        g, out = self.graphs[attend_len]
        g.replay()
        return out


def _decode_state(model, batch, total, dtype, device, use_graph):
    """KV cache + decode step (with its CUDA graphs) kept on the model between calls of the same
    batch size and bucketed length, so PPO's repeated rollouts capture graphs once. Only the last
    shape is kept (a GPT-2B cache at batch 64 x 512 is 6 GB). The graphs read the parameters in
    place: optimizer steps are seen; replacing parameter tensors needs clear_generation_state()."""
    cap = -(-total // _BUCKET) * _BUCKET
    key = (batch, cap, dtype, str(device), use_graph)
    state = model.__dict__.get("_generation_state")
    if state is None or state[0] != key:
        model.__dict__["_generation_state"] = None  # free the old cache before allocating
        cache = KVCache(model, batch, cap, dtype, device)
        state = (key, cache, _DecodeStep(model, cache, batch, use_graph))
        model.__dict__["_generation_state"] = state
    return state[1], state[2]


def clear_generation_state(model) -> None:
    model.__dict__.pop("_generation_state", None)


@torch.no_grad()
def generate(model: GPTModel, prompts: Union[Sequence[Sequence[int]], torch.Tensor], prompt_lengths=None, *,
             max_length: int = 64, min_length: int = 0, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, greedy: bool = False, end_token_ids: Sequence[int] = (),
             eos_id: Optional[int] = None, end_strings: Sequence[str] = (),
             detokenize: Optional[Callable[[List[int]], str]] = None, pad_id: int = 0,
             seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
             return_logprobs: bool = False, use_cuda_graph: Optional[bool] = None) -> GenerationOutput:
    """Sample up to `max_length` new tokens per prompt. A row stops at an end token (`eos_id`,
    `end_token_ids`) or when its text ends with one of `end_strings` (needs `detokenize`, which
    maps token ids to text; checked on the generated part only), never before `min_length`."""
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    tokens, plen = pad_prompts(prompts, prompt_lengths, pad_id, dev)
    b, p = tokens.shape
    total = p + max_length
    if end_strings and detokenize is None:
        raise ValueError("end_strings need a detokenize callback (token ids -> text)")
    ends = sorted(set(end_token_ids) | ({eos_id} if eos_id is not None else set()))
    end_t = torch.tensor(ends, dtype=torch.long, device=dev)
    if generator is None and seed is not None and not greedy:
        generator = torch.Generator(device=dev).manual_seed(seed)
    use_graph = dev.type == "cuda" if use_cuda_graph is None else use_cuda_graph

    cache, step = _decode_state(model, b, total, dtype, dev, use_graph)
    out = torch.full((b, total), pad_id, dtype=torch.long, device=dev)
    out[:, :p] = tokens
    lp = torch.zeros(b, total, device=dev) if return_logprobs else None
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    n_gen = torch.zeros(b, dtype=torch.long, device=dev)
    rows = torch.arange(b, device=dev)

    cache.mode = "prefill"
    h = model.hidden_states(tokens, cache=cache)
    logits = model.logits(h[rows, plen - 1]).float()  # only each row's last prompt token
    pos = plen.clone()  # where this step's token goes
    try:
        for t in range(max_length):
            if t < min_length and len(ends):
                logits[:, end_t] = float("-inf")
            nxt = sample_next(logits, temperature, top_k, top_p, greedy, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out.scatter_(1, pos[:, None], nxt[:, None])
            if lp is not None:
                # under the logits before temperature/top-k/top-p (the policy's own distribution;
                # the min_length mask included, so it is the distribution the token came from)
                tok_lp = logits.log_softmax(-1).gather(1, nxt[:, None]).squeeze(1)
                lp.scatter_(1, pos[:, None], torch.where(done, torch.zeros_like(tok_lp), tok_lp)[:, None])
            n_gen += (~done).long()
            if len(ends):
                done |= torch.isin(nxt, end_t)
            if end_strings and t + 1 >= min_length:  # min_length holds for end strings as for end tokens
                done |= _ends_with(out, plen, n_gen, done, end_strings, detokenize)
            if t == max_length - 1 or ((t % 8 == 7 or end_strings) and bool(done.all())):
                break
            attend = min(cache.k.shape[3], -(-(p + t + 1) // _BUCKET) * _BUCKET)
            logits = step(nxt, pos, attend)
            pos = pos + 1
    finally:
        model.train(was_training)
    return GenerationOutput(out, plen + n_gen, plen, lp, done)


def _ends_with(out, plen, n_gen, done, end_strings, detokenize) -> torch.Tensor:
    """Rows whose generated text now ends with an end string. Only the last few tokens are decoded
    (a token carries at least one byte, so len(string) + 4 tokens hold the string): decoding every
    row's whole response at every step made long rollouts quadratic."""
    flags = torch.zeros_like(done)
    tail = max(len(s.encode("utf-8")) for s in end_strings) + 4
    o, pl, ng, dn = out.tolist(), plen.tolist(), n_gen.tolist(), done.tolist()
    for i in range(len(o)):
        if dn[i]:
            continue
        end = pl[i] + ng[i]
        text = detokenize(o[i][max(pl[i], end - tail): end])
        flags[i] = any(text.endswith(s) for s in end_strings)
    return flags
