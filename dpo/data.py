"""DPO pairs: (prompt, chosen response, rejected response) token ids, global batches, and micro-batches in
which the chosen and rejected sequences of a pair always run in the same forward pass.

Sources (`model.data.data_prefix`, JSONL):
- the prep stage's `{split}_comparisons.jsonl` (`{"text": ...}` lines, chosen then rejected): the prompt
  is the dialogue both share up to its last "\\n\\nAssistant:" (prep's own prompt), the responses what
  follows it;
- `{"prompt", "chosen", "rejected"}` records: the responses follow the prompt as written.

The prompt and each response are tokenized on their own (a response as a policy generates it after its
prompt); each response ends with EOS. Too long (prompt + longer response > seq_length): the prompt
loses its start, then (if still too long) the responses their ends. Pairs whose responses are identical
carry no preference and are skipped; every skip is counted by reason with its line numbers.
"""
from __future__ import annotations

import gzip
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from engine.packing import pack_balanced

log = logging.getLogger(__name__)
ASSISTANT = "\n\nAssistant:"


def split_prompt(chosen: str, rejected: str) -> Optional[Tuple[str, str, str]]:
    """Two whole dialogues of one pair -> (prompt, chosen response, rejected response), or None when
    they share no prompt that ends with an assistant turn."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    i = chosen.rfind(ASSISTANT, 0, n)
    if i < 0:
        return None
    cut = i + len(ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _lines(path: str):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line


def read_pairs(path: str, skipped: Counter, where: Dict[str, List[str]]) -> List[Tuple[str, int, Tuple[str, str, str]]]:
    """(source, line, (prompt, chosen response, rejected response)) of one JSONL file."""
    out = []
    pending = None  # prep's layout: a chosen line waits for its rejected line

    def skip(reason, n):
        skipped[reason] += 1
        where.setdefault(reason, []).append(f"{path} line {n}")
    for n, line in _lines(path):
        try:
            rec = json.loads(line)
        except ValueError:
            skip("bad_json", n)
            continue
        if not isinstance(rec, dict):
            skip("not_an_object", n)
        elif "text" in rec and isinstance(rec["text"], str):
            if pending is None:
                pending = (n, rec["text"])
                continue
            (n0, chosen), pending = pending, None
            parts = split_prompt(chosen, rec["text"])
            if parts is None:
                skip("no_shared_prompt", n0)
            else:
                out.append((path, n0, parts))
        elif all(isinstance(rec.get(k), str) for k in ("prompt", "chosen", "rejected")):
            out.append((path, n, (rec["prompt"], rec["chosen"], rec["rejected"])))
        else:
            missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(rec.get(k), str)]
            skip(f"missing_{missing[0]}", n)
    if pending is not None:
        skip("unpaired_last_line", pending[0])
    return out


@dataclass
class PairSet:
    """Tokenized pairs of one split: prompt[k], chosen[k], rejected[k] (int64 arrays; responses end with EOS)."""
    prompt: List[np.ndarray]
    chosen: List[np.ndarray]
    rejected: List[np.ndarray]
    name: str = "train"
    stats: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self):
        p = np.array([len(x) for x in self.prompt], dtype=np.int64)
        c = np.array([len(x) for x in self.chosen], dtype=np.int64)
        r = np.array([len(x) for x in self.rejected], dtype=np.int64)
        self.pair_tokens = 2 * p + c + r  # what a packed row holds of the pair
        self.lengths = p + np.maximum(c, r)  # the padded width the pair needs

    def __len__(self) -> int:
        return len(self.prompt)


def tokenize_pairs(tok, records, seq_length: int, add_bos: bool = False, name: str = "train",
                   skipped: Optional[Counter] = None, where: Optional[Dict[str, List[str]]] = None) -> PairSet:
    skipped = Counter() if skipped is None else skipped
    where = {} if where is None else where
    P, C, R = [], [], []
    truncated = 0
    bos = [tok.bos_id] if add_bos and getattr(tok, "bos_id", None) is not None else []
    for src, line, (prompt, chosen, rejected) in records:
        if chosen == rejected:
            skipped["identical_responses"] += 1
            where.setdefault("identical_responses", []).append(f"{src} line {line}")
            continue
        p = np.asarray(bos + tok.encode(prompt), dtype=np.int64)
        if not len(p):  # the first response token needs a token to be predicted from
            skipped["empty_prompt"] += 1
            where.setdefault("empty_prompt", []).append(f"{src} line {line}")
            continue
        c = np.asarray(tok.encode(chosen) + [tok.eos_id], dtype=np.int64)
        r = np.asarray(tok.encode(rejected) + [tok.eos_id], dtype=np.int64)
        longest = max(len(c), len(r))
        if len(p) + longest > seq_length:
            truncated += 1
            keep = max(1, seq_length - longest)
            p = p[-keep:]
            room = seq_length - len(p)
            c, r = c[:room], r[:room]
        P.append(p)
        C.append(c)
        R.append(r)
    stats = {"pairs": len(P), "truncated": truncated, "skipped": dict(skipped),
             "skipped_where": {k: v[:10] for k, v in where.items()}}
    if truncated or skipped:
        log.info("%s: %d pairs; %d longer than seq_length=%d truncated; skipped %s", name, len(P), truncated,
                 seq_length, dict(skipped) or "none")
    return PairSet(P, C, R, name, stats)


def load_pairs(tok, paths: Sequence[str], seq_length: int, name: str, add_bos: bool = False) -> PairSet:
    skipped: Counter = Counter()
    where: Dict[str, List[str]] = {}
    records = [r for p in paths for r in read_pairs(str(p), skipped, where)]
    return tokenize_pairs(tok, records, seq_length, add_bos, name, skipped, where)


# --- batch plans ------------------------------------------------------------------------------

def global_batches(n: int, gbs: int, seed: int, epoch: int, shuffle: bool = True) -> List[np.ndarray]:
    """One epoch as global batches of exactly `gbs` pairs (a seeded permutation; the rest dropped)."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    order = order[: (n // gbs) * gbs]
    return [order[i: i + gbs] for i in range(0, len(order), gbs)]


def rank_share(batch: np.ndarray, sizes: np.ndarray, dp: int, rank: int) -> np.ndarray:
    """This rank's pairs: sorted by size and dealt in snake order (equal counts, balanced tokens)."""
    b = batch[np.argsort(sizes[batch], kind="stable")]
    pos = np.arange(len(b)) % (2 * dp)
    owner = np.where(pos < dp, pos, 2 * dp - 1 - pos)
    return b[owner == rank]


pack_pairs = pack_balanced  # pairs whole, chosen and rejected in one row (engine/packing.py)


@dataclass
class DPOBatch:
    """Sequences [chosen_0, rejected_0, chosen_1, ...] of `pairs` pairs: padded rows [2m, L], or one
    packed row [1, T] with `doc_lengths` (pad tail last). target_mask [rows, L-1] is 1 where token t+1
    is a response token; seq_index says whose (0..2m-1; -1 elsewhere)."""
    input_ids: torch.Tensor
    target_mask: torch.Tensor
    seq_index: torch.Tensor
    doc_lengths: Optional[torch.Tensor] = None
    pairs: int = 0
    tokens: int = 0
    padded_tokens: int = 0

    def to(self, device) -> "DPOBatch":
        nb = device.type == "cuda"
        return DPOBatch(self.input_ids.to(device, non_blocking=nb), self.target_mask.to(device, non_blocking=nb),
                        self.seq_index.to(device, non_blocking=nb), self.doc_lengths, self.pairs, self.tokens,
                        self.padded_tokens)


def _sequences(ds: PairSet, indices: Sequence[int]):
    for k in indices:
        p = ds.prompt[int(k)]
        for resp in (ds.chosen[int(k)], ds.rejected[int(k)]):
            yield np.concatenate([p, resp]), len(p)


def collate(ds: PairSet, indices: Sequence[int], pad_id: int, pad_to_multiple: int = 8) -> DPOBatch:
    seqs = list(_sequences(ds, indices))
    width = max(len(s) for s, _ in seqs)
    width = -(-width // max(1, pad_to_multiple)) * max(1, pad_to_multiple)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    seq = np.full((len(seqs), width - 1), -1, dtype=np.int64)
    for i, (s, p) in enumerate(seqs):
        ids[i, : len(s)] = s
        seq[i, p - 1: len(s) - 1] = i  # column t predicts token t+1: the response is tokens p..len-1
    return DPOBatch(torch.from_numpy(ids), torch.from_numpy((seq >= 0).astype(np.float32)), torch.from_numpy(seq),
                    None, len(indices), int(sum(len(s) for s, _ in seqs)), int(ids.size))


def collate_packed(ds: PairSet, indices: Sequence[int], pad_id: int, pad_to_multiple: int = 128) -> DPOBatch:
    seqs = list(_sequences(ds, indices))
    real = int(sum(len(s) for s, _ in seqs))
    width = -(-real // max(1, pad_to_multiple)) * max(1, pad_to_multiple)
    ids = np.full((1, width), pad_id, dtype=np.int64)
    seq = np.full(width, -1, dtype=np.int64)
    at = 0
    for i, (s, p) in enumerate(seqs):
        ids[0, at: at + len(s)] = s
        seq[at + p - 1: at + len(s) - 1] = i
        at += len(s)
    seq = seq[None, :-1]
    doc_lengths = [len(s) for s, _ in seqs] + ([width - real] if width > real else [])
    return DPOBatch(torch.from_numpy(ids), torch.from_numpy((seq >= 0).astype(np.float32)), torch.from_numpy(seq),
                    torch.tensor(doc_lengths), len(indices), real, width)


def sequence_logps(model, batch: DPOBatch, average: bool = False, documents=None) -> torch.Tensor:
    """[2m] log pi of each sequence's response tokens (sum, or mean with `average`), in fp32."""
    from .loss import sequence_logps as reduce

    h = model.hidden_states(batch.input_ids, documents=documents)[:, :-1]
    sel = batch.target_mask.bool()
    logits = model.logits(h[sel]).float()
    lp = logits.gather(-1, batch.input_ids[:, 1:][sel][:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
    return reduce(lp, batch.seq_index[sel], 2 * batch.pairs, average)
