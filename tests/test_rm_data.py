"""rm_training data and loss: mmap pairs, the overlong rule, blending, length-aware batch plans,
collation, the Bradley-Terry loss and its metrics."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_prep.indexed import MMapIndexedWriter
from rm_training.data import PairDataset, collate, global_batches, micro_batches, parse_prefixes
from rm_training.loss import PairStats, bradley_terry_loss, pair_sums, split_rewards


def write_pairs(prefix, lengths, dtype=np.uint16, seed=0):
    """Documents 2i/2i+1 with lengths[i] = (chosen, rejected); token t of a doc = doc index * 1000 + t % 1000."""
    w = MMapIndexedWriter(str(prefix), dtype)
    for i, (lc, lr) in enumerate(lengths):
        w.add_document([(2 * i) % 60 + 1] + list(range(2, lc + 1)))
        w.add_document([(2 * i + 1) % 60 + 1] + list(range(2, lr + 1)))
    w.finish()
    return str(prefix)


def test_pairs_overlong_truncate_and_drop(tmp_path):
    p = write_pairs(tmp_path / "d", [(5, 7), (12, 3), (4, 4), (3, 20)])
    ds = PairDataset([p], seq_length=10, overlong="truncate")
    assert len(ds) == 4 and ds.stats.truncated == 2 and ds.stats.dropped == 0
    c, r = ds.pair(1)
    assert len(c) == 10 and c[-1] == 12 and c[0] == 3  # kept the end of the dialogue
    assert list(ds.lengths) == [7, 10, 4, 10]
    dropped = PairDataset([p], seq_length=10, overlong="drop")
    assert len(dropped) == 2 and dropped.stats.dropped == 2
    assert [len(x) for x in dropped.pair(1)] == [4, 4]


def test_blending_weights(tmp_path):
    a = write_pairs(tmp_path / "a", [(3, 3)] * 10)
    b = write_pairs(tmp_path / "b", [(4, 4)] * 30, dtype=np.int32)
    assert parse_prefixes([0.75, a, 0.25, b]) == [(0.75, a), (0.25, b)]
    ds = PairDataset([0.75, a, 0.25, b], seq_length=16)
    assert len(ds) == 40 and (ds.src == 0).sum() == 30 and (ds.src == 1).sum() == 10
    with pytest.raises(ValueError):
        parse_prefixes([0.5, a, b])


def test_global_batches_cover_epoch_once_and_group_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=1000)
    batches = global_batches(lengths, gbs=32, seed=1, epoch=0, window=8)
    flat = np.concatenate(batches)
    assert all(len(b) == 32 for b in batches) and len(batches) == 1000 // 32
    assert len(np.unique(flat)) == len(flat)  # no pair twice
    spread = np.mean([lengths[b].max() / lengths[b].mean() for b in batches])
    rand = np.mean([lengths[b].max() / lengths[b].mean() for b in global_batches(lengths, 32, 1, 0, window=0)])
    assert spread < 1.3 and rand > 1.8  # grouped batches need far less padding than random ones
    assert not np.array_equal(np.concatenate(global_batches(lengths, 32, 1, 1, window=8)), flat)  # new order per epoch
    assert np.array_equal(np.concatenate(global_batches(lengths, 32, 1, 0, window=8)), flat)  # reproducible


def test_micro_batches_split_ranks_and_token_cap():
    lengths = np.arange(1, 17) * 10
    batch = np.random.default_rng(0).permutation(16)
    r0 = micro_batches(batch, lengths, mbs=4, dp=2, rank=0)
    r1 = micro_batches(batch, lengths, mbs=4, dp=2, rank=1)
    assert sorted(np.concatenate(r0 + r1).tolist()) == list(range(16)) and len(r0) == len(r1) == 2
    # balanced: each rank's padded work (pairs x longest, per micro-batch) within 15% of the other's;
    # contiguous halves of the sorted batch gave rank 1 about 1.8x rank 0's
    work = [sum(len(m) * lengths[m].max() for m in r) for r in (r0, r1)]
    assert max(work) / min(work) < 1.15, work
    one = micro_batches(batch, lengths, mbs=8, dp=2, rank=0) + micro_batches(batch, lengths, mbs=8, dp=2, rank=1)
    assert [len(m) for m in one] == [8, 8] and max(lengths[one[1]]) - max(lengths[one[0]]) <= 10
    capped = micro_batches(batch, lengths, mbs=8, dp=1, rank=0, max_tokens=1000)
    assert sorted(np.concatenate(capped).tolist()) == list(range(16))
    assert all(len(m) == 1 or 2 * len(m) * lengths[m].max() <= 1000 for m in capped)


def test_collate_interleaves_and_pads(tmp_path):
    p = write_pairs(tmp_path / "d", [(5, 7), (3, 2)])
    ds = PairDataset([p], seq_length=64)
    b = collate(ds, [0, 1], pad_id=0, pad_to_multiple=8)
    assert b.input_ids.shape == (4, 8) and b.lengths.tolist() == [5, 7, 3, 2]
    assert b.tokens == 17 and b.padded_tokens == 32
    assert b.input_ids[3, 2:].eq(0).all() and b.input_ids[1, 6] == 7


def test_bradley_terry_loss_and_metrics():
    rewards = torch.tensor([2.0, 1.0, -1.0, 0.5, 0.3, 0.3])
    c, r = split_rewards(rewards)
    losses = bradley_terry_loss(c, r)
    assert torch.allclose(losses, -F.logsigmoid(c - r))
    m = PairStats.metrics(PairStats(None).vector().new_tensor(
        [float(v) for v in pair_sums(c, r, losses).values()]).tolist())
    assert m["accuracy"] == pytest.approx(1 / 3) and m["pairs"] == 3
    assert m["margin"] == pytest.approx(float((c - r).mean()))
    assert m["chosen_reward_std"] == pytest.approx(float(c.double().std(unbiased=False)), rel=1e-6)
    assert m["loss"] == pytest.approx(float(losses.mean()), rel=1e-6)
