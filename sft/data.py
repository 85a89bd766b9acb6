"""SFT samples: token ids with a per-token loss mask, global batches, padded and packed micro-batches.

Two sources:
- the prep stage's comparison JSONL (`{split}_comparisons.jsonl`, `{"text": ...}` a line, chosen then
  rejected): the chosen dialogues, cut into turns (`hh_segments`): "User: ...\\n\\nAssistant:" carries no
  loss, the " response" after it does (with `answer_only_loss`), on every assistant turn;
- a JSONL of records whose fields fill NeMo's `prompt_template` ("{input} {output}"): the text before
  the `{label_key}` field is the prompt, the rest the response.

Each segment is tokenized on its own and the ids concatenated, so the loss mask is exact and a
response is tokenized as it is generated later (after its prompt's tokens: PPO's rollouts). With
`add_eos` the EOS closes the sample and is a target (the model learns to stop).

A sample's targets are `loss[1:]` (token t is predicted from tokens < t). A global batch's loss is the
mean over all its target tokens, whatever its cut into micro-batches, rows or ranks: each micro-batch
contributes sum(nll) / targets(global batch).

Packing (`pack_samples`, `collate_packed`): a rank's samples end to end in rows of at most
`packed_tokens`; `modeling.layers.pack_documents` keeps attention inside each sample and restarts its
positions, and a sample's last token never gets the next sample's first token as a target.
"""
from __future__ import annotations

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
NEXT_USER = "\n\nUser:"


def hh_segments(text: str) -> List[Tuple[str, bool]]:
    """An HH dialogue in prep's format ("User: q\\n\\nAssistant: a\\n\\nUser: ...") -> [(text, is_response)]:
    each prompt part ends with "Assistant:", each response part is what follows up to the next
    "\\n\\nUser:" (its leading space included, as a policy generates it after the prompt)."""
    out: List[Tuple[str, bool]] = []
    pos = 0
    while pos < len(text):
        i = text.find(ASSISTANT, pos)
        if i < 0:
            out.append((text[pos:], False))
            break
        j = i + len(ASSISTANT)
        out.append((text[pos:j], False))
        k = text.find(NEXT_USER, j)
        k = len(text) if k < 0 else k
        if k > j:
            out.append((text[j:k], True))
        pos = k
    return out


def template_segments(record: dict, template: str, label_key: str) -> List[Tuple[str, bool]]:
    """NeMo's prompt_template filled from a record: [(prompt, False), (response part, True)]."""
    marker = "{" + label_key + "}"
    at = template.find(marker)
    if at < 0:
        raise ValueError(f"prompt_template {template!r} has no {marker} field (label_key={label_key!r})")
    head, tail = template[:at], template[at:]
    return [(head.format(**record), False), (tail.format(**record), True)]


def tokenize_segments(tok, segments: Sequence[Tuple[str, bool]], answer_only_loss: bool = True,
                      add_bos: bool = False, add_eos: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """-> (ids int64 [n], loss bool [n]): loss[i] = token i is a target."""
    ids: List[int] = []
    loss: List[bool] = []
    if add_bos and getattr(tok, "bos_id", None) is not None:
        ids.append(tok.bos_id)
        loss.append(False)
    for text, is_response in segments:
        if not text:
            continue
        t = tok.encode(text)
        ids.extend(t)
        loss.extend([bool(is_response or not answer_only_loss)] * len(t))
    if add_eos:
        ids.append(tok.eos_id)
        loss.append(True)
    return np.asarray(ids, dtype=np.int64), np.asarray(loss, dtype=bool)


def read_jsonl(path: str, skipped: Counter, where: Dict[str, List[int]]) -> List[Tuple[int, dict]]:
    """(line number, record) of each JSON object line; bad lines counted by reason with line numbers."""
    out = []
    opener = open
    if str(path).endswith(".gz"):
        import gzip
        opener = gzip.open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                skipped["bad_json"] += 1
                where.setdefault("bad_json", []).append(n)
                continue
            if not isinstance(rec, dict):
                skipped["not_an_object"] += 1
                where.setdefault("not_an_object", []).append(n)
                continue
            out.append((n, rec))
    return out


@dataclass
class SFTDataset:
    """Tokenized samples of one split; `stats` counts what was kept, truncated and skipped (by reason)."""
    ids: List[np.ndarray]
    loss: List[np.ndarray]
    name: str = "train"
    stats: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self):
        self.lengths = np.array([len(x) for x in self.ids], dtype=np.int64)
        self.targets = np.array([int(m[1:].sum()) for m in self.loss], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)


def build_dataset(tok, records: Sequence[Tuple[str, int, List[Tuple[str, bool]]]], max_seq_length: int,
                  min_seq_length: int = 1, truncation_method: str = "right", answer_only_loss: bool = True,
                  add_bos: bool = False, add_eos: bool = True, name: str = "train") -> SFTDataset:
    """(source, line, segments) records -> SFTDataset. Over-long samples are cut (`truncation_method`
    right: keep the start, left: keep the end); samples with no target left, or shorter than
    `min_seq_length`, are skipped and counted."""
    if truncation_method not in ("right", "left"):
        raise ValueError(f"truncation_method={truncation_method!r}: expected right | left")
    ids, losses = [], []
    skipped: Counter = Counter()
    lines: Dict[str, List[str]] = {}
    truncated = 0
    for src, line, segs in records:
        t, m = tokenize_segments(tok, segs, answer_only_loss, add_bos, add_eos)
        if len(t) > max_seq_length:
            truncated += 1
            sl = slice(0, max_seq_length) if truncation_method == "right" else slice(len(t) - max_seq_length, None)
            t, m = t[sl], m[sl]
        reason = "too_short" if len(t) < max(min_seq_length, 2) else "no_target_tokens" if not m[1:].any() else None
        if reason:
            skipped[reason] += 1
            lines.setdefault(reason, []).append(f"{src} line {line}")
            continue
        ids.append(t)
        losses.append(m)
    stats = {"samples": len(ids), "truncated": truncated, "skipped": dict(skipped),
             "skipped_where": {k: v[:10] for k, v in lines.items()}, "tokens": int(sum(len(x) for x in ids)),
             "target_tokens": int(sum(int(m[1:].sum()) for m in losses))}
    if truncated or skipped:
        log.info("%s: %d samples; %d longer than max_seq_length=%d truncated (%s); skipped %s", name, len(ids),
                 truncated, max_seq_length, truncation_method, dict(skipped) or "none")
    return SFTDataset(ids, losses, name, stats)


def hh_records(comparisons_path: str) -> List[Tuple[str, int, List[Tuple[str, bool]]]]:
    """The chosen dialogues (lines 1, 3, 5, ...) of prep's `{split}_comparisons.jsonl`, cut into turns."""
    skipped: Counter = Counter()
    where: Dict[str, List[int]] = {}
    rows = read_jsonl(comparisons_path, skipped, where)
    if skipped:
        raise ValueError(f"{comparisons_path}: not prep's comparison JSONL ({dict(skipped)} at lines {where})")
    return [(comparisons_path, n, hh_segments(rec["text"])) for k, (n, rec) in enumerate(rows) if k % 2 == 0]


def template_records(path: str, template: str, label_key: str, skipped: Counter,
                     where: Dict[str, List[int]]) -> List[Tuple[str, int, List[Tuple[str, bool]]]]:
    """Records of a prompt/response JSONL through prompt_template; records missing a field are
    skipped and counted (`missing_<field>`) with their line numbers."""
    out = []
    for n, rec in read_jsonl(path, skipped, where):
        try:
            out.append((path, n, template_segments(rec, template, label_key)))
        except KeyError as e:
            reason = f"missing_{e.args[0]}"
            skipped[reason] += 1
            where.setdefault(reason, []).append(n)
    return out


# --- batch plans ------------------------------------------------------------------------------

def global_batches(n: int, gbs: int, seed: int, epoch: int, shuffle: bool = True,
                   drop_last: bool = True) -> List[np.ndarray]:
    """One epoch as global batches of sample indices (a seeded permutation per epoch)."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    stop = (n // gbs) * gbs if drop_last else n
    return [order[i: i + gbs] for i in range(0, stop, gbs)]


def rank_share(batch: np.ndarray, lengths: np.ndarray, dp: int, rank: int) -> np.ndarray:
    """This rank's samples of a global batch: sorted by length and dealt in snake order (equal counts,
    balanced tokens), still sorted."""
    b = batch[np.argsort(lengths[batch], kind="stable")]
    pos = np.arange(len(b)) % (2 * dp)
    owner = np.where(pos < dp, pos, 2 * dp - 1 - pos)
    return b[owner == rank]


pack_samples = pack_balanced  # samples, by their lengths (engine/packing.py)


@dataclass
class SFTBatch:
    """A micro-batch. Padded: input_ids [m, L]; packed: [1, T] with `doc_lengths` (pad tail last).
    `target_mask` [rows, L-1]: column t is 1 where token t+1 is a target of the same sample."""
    input_ids: torch.Tensor
    target_mask: torch.Tensor
    doc_lengths: Optional[torch.Tensor] = None
    samples: int = 0
    tokens: int = 0
    padded_tokens: int = 0

    def to(self, device) -> "SFTBatch":
        nb = device.type == "cuda"
        return SFTBatch(self.input_ids.to(device, non_blocking=nb), self.target_mask.to(device, non_blocking=nb),
                        self.doc_lengths, self.samples, self.tokens, self.padded_tokens)


def collate(ds: SFTDataset, indices: Sequence[int], pad_id: int, pad_to_multiple: int = 8) -> SFTBatch:
    seqs = [ds.ids[int(k)] for k in indices]
    width = max(len(s) for s in seqs)
    width = -(-width // max(1, pad_to_multiple)) * max(1, pad_to_multiple)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    tmask = np.zeros((len(seqs), width - 1), dtype=np.float32)
    for i, k in enumerate(indices):
        s, m = ds.ids[int(k)], ds.loss[int(k)]
        ids[i, : len(s)] = s
        tmask[i, : len(s) - 1] = m[1:]
    return SFTBatch(torch.from_numpy(ids), torch.from_numpy(tmask), None, len(seqs),
                    int(sum(len(s) for s in seqs)), int(ids.size))


def collate_packed(ds: SFTDataset, indices: Sequence[int], pad_id: int, pad_to_multiple: int = 128) -> SFTBatch:
    seqs = [ds.ids[int(k)] for k in indices]
    real = int(sum(len(s) for s in seqs))
    width = -(-real // max(1, pad_to_multiple)) * max(1, pad_to_multiple)
    ids = np.full((1, width), pad_id, dtype=np.int64)
    ids[0, :real] = np.concatenate(seqs)
    # per sample: targets loss[1:] then 0 at its last token (whose "next" token is another sample's)
    tm = np.zeros(width, dtype=np.float32)
    tm[:real] = np.concatenate([np.append(ds.loss[int(k)][1:], False) for k in indices])
    doc_lengths = [len(s) for s in seqs] + ([width - real] if width > real else [])
    return SFTBatch(torch.from_numpy(ids), torch.from_numpy(tm[None, :-1]), torch.tensor(doc_lengths),
                    len(seqs), real, width)
