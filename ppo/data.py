"""Prompts for rollouts: `{split}_prompts.jsonl` ({"text": prompt} per line), tokenized once.

A prompt longer than `max_prompt_tokens` keeps its last tokens (the end of the dialogue, with the
"Assistant:" turn the policy must answer); how many were cut is logged. Batches are a pure
function of (seed, step): the prompts of step k are positions [k * n, (k + 1) * n) of an endless
sequence of seeded permutations (one per epoch), so a resumed run draws exactly the prompts the
uninterrupted run would have drawn, with no sampler state to save.
"""
from __future__ import annotations

import json
import logging
from typing import Iterable, List, Sequence

import torch

log = logging.getLogger(__name__)


def read_prompts(paths: Iterable[str]) -> List[str]:
    texts: List[str] = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    texts.append(json.loads(line)["text"])
                except (ValueError, KeyError) as e:
                    raise ValueError(f"{path}:{n}: expected a JSON object with a 'text' key ({e})") from e
    return texts


class PromptDataset:
    """Tokenized prompts; `batch(step, n)` -> the step's n prompts (lists of token ids)."""

    def __init__(self, paths: Sequence[str], tokenizer, max_prompt_tokens: int, seed: int = 1234,
                 shuffle: bool = True, add_bos: bool = False):
        if isinstance(paths, str):
            paths = [paths]
        self.texts = read_prompts(paths)
        if not self.texts:
            raise ValueError(f"no prompts in {list(paths)}")
        ids = tokenizer.encode_batch(self.texts) if hasattr(tokenizer, "encode_batch") else \
            [tokenizer.encode(t) for t in self.texts]
        bos = getattr(tokenizer, "bos_id", None) if add_bos else None
        self.truncated = 0
        self.prompts: List[List[int]] = []
        for x in ids:
            x = ([bos] if bos is not None else []) + list(x)
            if not x:
                x = [tokenizer.eos_id]  # an empty prompt still needs a token to condition on
            if len(x) > max_prompt_tokens:
                self.truncated += 1
                x = x[-max_prompt_tokens:]
            self.prompts.append(x)
        if self.truncated:
            log.info("%d of %d prompts were longer than %d tokens: kept their last %d tokens",
                     self.truncated, len(self.prompts), max_prompt_tokens, max_prompt_tokens)
        self.seed, self.shuffle = seed, shuffle

    def __len__(self) -> int:
        return len(self.prompts)

    def _order(self, epoch: int) -> List[int]:
        if not self.shuffle:
            return list(range(len(self)))
        g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        return torch.randperm(len(self), generator=g).tolist()

    def indices(self, start: int, n: int) -> List[int]:
        """Positions start..start+n-1 of the endless epoch sequence."""
        out: List[int] = []
        pos = start
        while len(out) < n:
            epoch, offset = divmod(pos, len(self))
            order = self._order(epoch)
            take = order[offset: offset + n - len(out)]
            out += take
            pos += len(take)
        return out

    def batch(self, step: int, n: int, rank: int = 0, world: int = 1) -> List[List[int]]:
        """The n prompts of `step` (global), this rank's contiguous share of them."""
        idx = self.indices(step * n, n)
        share = n // world
        return [self.prompts[i] for i in idx[rank * share:(rank + 1) * share]]

    def epoch_of(self, step: int, n: int) -> int:
        return (step * n) // len(self)
