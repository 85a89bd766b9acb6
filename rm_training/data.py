"""Comparison pairs from Megatron mmap files, the overlong rule, and length-aware batch plans.

Pair i of a prefix is (document 2i = chosen, document 2i+1 = rejected), NEMO_FORMATS.md section 4.
`data_prefix` lists may blend: `[w1, prefix1, w2, prefix2]` takes round(w_i / sum(w) * N) pairs from
prefix i per epoch (N = all pairs of the listed prefixes), cycling through a prefix when its share
exceeds its size.

Overlong pairs (either side longer than `seq_length`): `truncate` keeps the LAST `seq_length`
tokens of that side (the final response, which the reward judges, stays whole; the start of
the dialogue goes), `drop` leaves the pair out. Both are counted in `PairDataset.stats`.

Batching (see `plan_epoch`): no padding to seq_length. An epoch is a seeded permutation; windows of
`window` global batches are sorted by pair length and cut into global batches of exactly
`global_batch_size` consecutive pairs, whose order is shuffled again. A global batch therefore
holds pairs of similar length and its micro-batches are padded only to their longest member; over
an epoch every pair is used once, as with random sampling. window=0 keeps random global batches
(sorted only inside each one).

Sequence packing (`packed_micro_batches`, `collate_packed`): instead of padding, a rank's pairs
are laid end to end, chosen then rejected, into micro-batches of at most `packed_tokens` tokens
(one row each; a block-diagonal causal mask keeps every document to itself). The global batch
and its loss are unchanged; only the cut into micro-batches differs, and padding shrinks to a
row's tail, rounded up to `pad_to_multiple`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from data_prep.indexed import bin_path, read_index
from engine.packing import pack_balanced

log = logging.getLogger(__name__)


class MMapDocuments:
    """Read-only view of a `.bin/.idx` pair: `len(docs)` documents, `docs[i]` -> int64 tokens."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        dtype, sizes, pointers, doc_idx = read_index(prefix)
        self.dtype = np.dtype(dtype)
        self.seq_sizes, self.seq_pointers, self.doc_idx = sizes, pointers, doc_idx
        self._bin = np.memmap(bin_path(prefix), dtype=self.dtype, mode="r")
        if len(doc_idx) == len(sizes) + 1 and (doc_idx == np.arange(len(sizes) + 1)).all():
            self.sizes = sizes.astype(np.int64)  # one sequence per document (what NeMo writes)
            self._multi = False
        else:  # documents of several sequences (sentence splitting): concatenate them
            starts, ends = doc_idx[:-1], doc_idx[1:]
            csum = np.concatenate([[0], np.cumsum(sizes.astype(np.int64))])
            self.sizes = csum[ends] - csum[starts]
            self._multi = True

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        if not self._multi:
            off = int(self.seq_pointers[i]) // self.dtype.itemsize
            return np.asarray(self._bin[off: off + int(self.seq_sizes[i])], dtype=np.int64)
        parts = []
        for s in range(int(self.doc_idx[i]), int(self.doc_idx[i + 1])):
            off = int(self.seq_pointers[s]) // self.dtype.itemsize
            parts.append(np.asarray(self._bin[off: off + int(self.seq_sizes[s])], dtype=np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def parse_prefixes(entries: Sequence) -> List[Tuple[float, str]]:
    """`[p1, p2]` or Megatron blending `[w1, p1, w2, p2]` -> [(weight, prefix)]."""
    entries = [str(e) if not isinstance(e, (int, float)) else e for e in (entries or [])]
    if not entries:
        return []
    def is_num(x):
        try:
            float(x)
            return True
        except (TypeError, ValueError):
            return False
    if all(not is_num(e) for e in entries):
        return [(1.0, e) for e in entries]
    if len(entries) % 2 or not all(is_num(w) and not is_num(p) for w, p in zip(entries[::2], entries[1::2])):
        raise ValueError(f"data_prefix {entries}: expected [prefix, ...] or [weight, prefix, weight, prefix, ...]")
    return [(float(w), p) for w, p in zip(entries[::2], entries[1::2])]


@dataclass
class SplitStats:
    pairs_in_files: int = 0
    pairs: int = 0
    truncated: int = 0
    dropped: int = 0
    odd_documents: int = 0
    tokens: int = 0
    max_pair_tokens: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class PairDataset:
    """All pairs of one split. `lengths[k]` = padded length the pair needs (max of its two sides
    after the overlong rule); `pair(k)` -> (chosen, rejected) int64 arrays."""

    def __init__(self, prefixes: Sequence, seq_length: int, overlong: str = "truncate", seed: int = 1234,
                 name: str = "train"):
        if overlong not in ("truncate", "drop"):
            raise ValueError(f"overlong={overlong!r}: expected truncate | drop")
        self.name, self.seq_length, self.overlong = name, int(seq_length), overlong
        self.stats = SplitStats()
        self.sources: List[MMapDocuments] = []
        src_ids, pair_ids = [], []
        weighted = parse_prefixes(prefixes)
        per_source = []
        for _, prefix in weighted:
            docs = MMapDocuments(prefix)
            if len(docs) % 2:
                log.warning("%s: odd number of documents (%d); the last one has no partner and is ignored",
                            prefix, len(docs))
                self.stats.odd_documents += 1
            self.sources.append(docs)
            per_source.append(len(docs) // 2)
        self.stats.pairs_in_files = int(sum(per_source))
        total = sum(per_source)
        wsum = sum(w for w, _ in weighted) or 1.0
        rng = np.random.default_rng(seed)
        for s, ((w, prefix), n) in enumerate(zip(weighted, per_source)):
            want = n if len(weighted) == 1 else int(round(w / wsum * total))
            if n == 0 or want == 0:
                continue
            if want >= n:  # all pairs, cycling through a seeded permutation for the excess
                extra = np.concatenate([rng.permutation(n) for _ in range(-(-(want - n) // n))])[: want - n] if want > n else []
                idx = np.concatenate([np.arange(n), np.asarray(extra, dtype=np.int64)])
            else:
                idx = np.sort(rng.permutation(n)[:want])
            src_ids.append(np.full(len(idx), s, dtype=np.int32))
            pair_ids.append(idx.astype(np.int64))
        src = np.concatenate(src_ids) if src_ids else np.zeros(0, np.int32)
        pid = np.concatenate(pair_ids) if pair_ids else np.zeros(0, np.int64)
        lc = np.array([self.sources[s].sizes[2 * p] for s, p in zip(src, pid)], dtype=np.int64)
        lr = np.array([self.sources[s].sizes[2 * p + 1] for s, p in zip(src, pid)], dtype=np.int64)
        longest = np.maximum(lc, lr) if len(lc) else np.zeros(0, np.int64)
        over = longest > self.seq_length
        if overlong == "drop":
            keep = ~over
            self.stats.dropped = int(over.sum())
        else:
            keep = np.ones(len(longest), bool)
            self.stats.truncated = int(over.sum())
        self.src, self.pid = src[keep], pid[keep]
        self.lengths = np.minimum(longest[keep], self.seq_length)
        # tokens of both sides (what a packed micro-batch holds of this pair)
        self.pair_tokens = np.minimum(lc[keep], self.seq_length) + np.minimum(lr[keep], self.seq_length)
        self.stats.pairs = int(len(self.src))
        self.stats.tokens = int(np.minimum(lc[keep], self.seq_length).sum() + np.minimum(lr[keep], self.seq_length).sum())
        self.stats.max_pair_tokens = int(self.lengths.max()) if len(self.lengths) else 0
        if over.any():
            log.info("%s: %d of %d pairs longer than seq_length=%d: %s", name, int(over.sum()), len(longest),
                     self.seq_length, "truncated (kept their last tokens)" if overlong == "truncate" else "dropped")

    def __len__(self) -> int:
        return len(self.src)

    def pair(self, k: int) -> Tuple[np.ndarray, np.ndarray]:
        docs, p = self.sources[int(self.src[k])], int(self.pid[k])
        c, r = docs[2 * p], docs[2 * p + 1]
        return c[-self.seq_length:], r[-self.seq_length:]  # overlong: keep the end


# --- batch plans ------------------------------------------------------------------------------

def global_batches(lengths: np.ndarray, gbs: int, seed: int, epoch: int, shuffle: bool = True,
                   window: int = 16) -> List[np.ndarray]:
    """One epoch as a list of global batches (arrays of pair indices, exactly `gbs` each; the last
    incomplete one is dropped, as Megatron's sampler does). See the module docstring."""
    n = len(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n) if shuffle else np.arange(n)
    order = order[: (n // gbs) * gbs]
    if window <= 0:
        return [b for b in order.reshape(-1, gbs)] if len(order) else []
    out: List[np.ndarray] = []
    span = window * gbs
    for start in range(0, len(order), span):
        chunk = order[start: start + span]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches = list(chunk.reshape(-1, gbs))
        if shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        out.extend(batches)
    return out


def _deal(sorted_batch: np.ndarray, dp: int, rank: int) -> np.ndarray:
    """Rank `rank`'s share of a length-sorted batch, dealt in snake order (0, 1, .., dp-1, dp-1, .., 0):
    equal pair counts (gbs is a multiple of dp) and balanced tokens; the share stays sorted."""
    pos = np.arange(len(sorted_batch)) % (2 * dp)
    owner = np.where(pos < dp, pos, 2 * dp - 1 - pos)
    return sorted_batch[owner == rank]


def micro_batches(batch: np.ndarray, lengths: np.ndarray, mbs: int, dp: int, rank: int,
                  max_tokens: Optional[int] = None) -> List[np.ndarray]:
    """This rank's micro-batches of one global batch. The batch is sorted by length and dealt to
    ranks in snake order, so every rank gets gbs / dp pairs and about 1/dp of the tokens (contiguous
    blocks gave the last rank the longest pairs, and every step waited for it); a rank's pairs, still
    sorted, are cut into micro-batches of `mbs` pairs of similar length. With `max_tokens`, a
    micro-batch whose padded size (2 x pairs x longest) is larger is split in halves until it fits
    (a single pair always runs)."""
    b = _deal(batch[np.argsort(lengths[batch], kind="stable")], dp, rank)
    mine = [b[i: i + mbs] for i in range(0, len(b), mbs)]
    if not max_tokens:
        return mine
    out: List[np.ndarray] = []
    stack = list(reversed(mine))
    while stack:
        m = stack.pop()
        if len(m) > 1 and 2 * len(m) * int(lengths[m].max()) > max_tokens:
            h = len(m) // 2
            stack.extend([m[h:], m[:h]])
        else:
            out.append(m)
    return out


@dataclass
class Batch:
    """A micro-batch: rows [chosen_0, rejected_0, chosen_1, rejected_1, ...], right-padded."""
    input_ids: torch.Tensor  # [2m, L]
    lengths: torch.Tensor  # [2m]
    pairs: int = 0
    tokens: int = 0  # real tokens
    padded_tokens: int = 0
    indices: List[int] = field(default_factory=list)

    def to(self, device) -> "Batch":
        nb = device.type == "cuda"
        return Batch(self.input_ids.to(device, non_blocking=nb), self.lengths.to(device, non_blocking=nb),
                     self.pairs, self.tokens, self.padded_tokens, self.indices)


def collate(ds: PairDataset, indices: Sequence[int], pad_id: int, pad_to_multiple: int = 1) -> Batch:
    seqs = []
    for k in indices:
        c, r = ds.pair(int(k))
        seqs.extend([c, r])
    lens = [len(s) for s in seqs]
    width = max(lens)
    if pad_to_multiple > 1:
        width = min(-(-width // pad_to_multiple) * pad_to_multiple, max(width, ds.seq_length))
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    t = torch.from_numpy(ids)
    if torch.cuda.is_available():
        t = t.pin_memory()
    return Batch(t, torch.tensor(lens, dtype=torch.long), pairs=len(indices), tokens=int(sum(lens)),
                 padded_tokens=int(ids.size), indices=[int(k) for k in indices])


# --- sequence packing -------------------------------------------------------------------------

pack_pairs = pack_balanced  # pairs whole, by pair_tokens (engine/packing.py)


def packed_micro_batches(batch: np.ndarray, pair_tokens: np.ndarray, dp: int, rank: int,
                         packed_tokens: int) -> List[np.ndarray]:
    """This rank's packed micro-batches of one global batch: the batch, sorted by pair tokens, is
    dealt to ranks in snake order (every rank gets gbs / dp pairs and about 1/dp of the tokens),
    then packed (`pack_pairs`)."""
    b = batch[np.argsort(pair_tokens[batch], kind="stable")]
    return pack_pairs(_deal(b, dp, rank), pair_tokens, packed_tokens)


@dataclass
class PackedBatch:
    """A packed micro-batch: one row [1, T] of documents chosen_0, rejected_0, chosen_1, ... laid end
    to end, then pad. `doc_lengths` lists every document's length, the pad tail last (when T
    exceeds the real tokens), so that `modeling.layers.pack_documents(doc_lengths, (1, T),
    real=2 * pairs)` describes it."""
    input_ids: torch.Tensor  # [1, T]
    doc_lengths: torch.Tensor  # [2m] or [2m + 1]
    pairs: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    indices: List[int] = field(default_factory=list)

    def to(self, device) -> "PackedBatch":
        nb = device.type == "cuda"
        return PackedBatch(self.input_ids.to(device, non_blocking=nb), self.doc_lengths,  # stays on the host
                           self.pairs, self.tokens, self.padded_tokens, self.indices)


def collate_packed(ds: PairDataset, indices: Sequence[int], pad_id: int, pad_to_multiple: int = 128) -> PackedBatch:
    seqs = []
    for k in indices:
        c, r = ds.pair(int(k))
        seqs.extend([c, r])
    lens = [len(s) for s in seqs]
    real = int(sum(lens))
    width = -(-real // max(1, pad_to_multiple)) * max(1, pad_to_multiple)
    ids = np.full((1, width), pad_id, dtype=np.int64)
    ids[0, :real] = np.concatenate(seqs)
    doc_lengths = lens + ([width - real] if width > real else [])
    t = torch.from_numpy(ids)
    if torch.cuda.is_available():
        t = t.pin_memory()
    return PackedBatch(t, torch.tensor(doc_lengths, dtype=torch.long), pairs=len(indices), tokens=real,
                       padded_tokens=width, indices=[int(k) for k in indices])
