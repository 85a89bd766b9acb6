"""Sequence packing for the reward model: packed rewards, losses and gradients equal the padded
ones (CPU, fp32) for GPT-2B-style (layernorm1p, partial rotary) and Llama-style (GQA, rmsnorm)
configs; the packing plan uses every pair of a global batch once within its token budget; a
trainer step with packing equals one without."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_prep.indexed import MMapIndexedWriter
from modeling import ModelConfig, RewardModel
from modeling.layers import document_positions, init_weights, pack_documents
from rm_training.data import PairDataset, collate, collate_packed, pack_pairs, packed_micro_batches
from rm_training.loss import bradley_terry_loss, split_rewards
from rm_training.trainer import LoopSettings, RMTrainer

CONFIGS = {
    "gpt2b_like": dict(normalization="layernorm1p", rotary_percentage=0.5),
    "llama_like": dict(normalization="rmsnorm", num_query_groups=2, rotary_percentage=1.0, activation="swiglu"),
    "gelu_layernorm": dict(normalization="layernorm", activation="gelu", rotary_percentage=0.25),
}


def tiny(**kw) -> RewardModel:
    cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, **kw)
    torch.manual_seed(0)
    m = RewardModel(cfg, 300)
    init_weights(m, cfg)
    torch.nn.init.normal_(m.rm_head.weight, 0, 0.5)
    return m


def padded_and_packed(lens, pad_tail, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, 300, (n,), generator=g) for n in lens]
    ids = torch.zeros(len(lens), max(lens), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    flat = torch.cat(seqs + [torch.zeros(pad_tail, dtype=torch.long)])[None]
    doc_lengths = torch.tensor(list(lens) + ([pad_tail] if pad_tail else []))
    return ids, flat, doc_lengths


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_packed_rewards_and_gradients_match_padded(name):
    lens = [7, 19, 1, 33, 4, 12, 25, 2]
    ids, flat, doc_lengths = padded_and_packed(lens, pad_tail=13)
    m = tiny(**CONFIGS[name])
    ref = m(ids, lengths=torch.tensor(lens))
    c, r = split_rewards(ref)
    bradley_terry_loss(c, r).sum().backward()
    ref_grads = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    docs = pack_documents(doc_lengths, tuple(flat.shape), "mask", real=len(lens))
    out = m(flat, documents=docs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    c, r = split_rewards(out)
    bradley_terry_loss(c, r).sum().backward()
    for k, p in m.named_parameters():
        err = float((p.grad - ref_grads[k]).norm())
        assert err <= 1e-5 * float(ref_grads[k].norm()) + 1e-6, (k, err)  # fp32 summation order only
    # FlexAttention's document BlockMask computes the same function (forward only on CPU)
    with torch.no_grad():
        flex = m(flat, documents=pack_documents(doc_lengths, tuple(flat.shape), "flex", real=len(lens)))
    torch.testing.assert_close(flex, ref.detach(), rtol=1e-5, atol=1e-5)


def test_document_positions_restart_and_no_pad_document():
    docs = pack_documents(torch.tensor([3, 2, 4]), (1, 9), "mask")
    assert document_positions(docs).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert docs.ends.tolist() == [2, 4, 8] and docs.cu_seqlens.tolist() == [0, 3, 5, 9]
    with pytest.raises(ValueError):
        pack_documents(torch.tensor([3, 2]), (1, 9), "mask")


def test_pack_plan_uses_every_pair_once_within_budget():
    rng = np.random.default_rng(0)
    tokens = rng.integers(20, 700, 256)
    tokens[7] = 5000  # longer than the budget: a micro-batch of its own
    batch = rng.permutation(256)[:64]
    for dp in (1, 2, 4):
        seen, per_rank = [], []
        for rank in range(dp):
            parts = packed_micro_batches(batch, tokens, dp, rank, 4096)
            per_rank.append(sum(len(p) for p in parts))
            for p in parts:
                assert tokens[p].sum() <= 4096 or len(p) == 1
            seen.extend(int(k) for p in parts for k in p)
        assert sorted(seen) == sorted(batch.tolist()) and per_rank == [64 // dp] * dp
    parts = pack_pairs(np.arange(100), np.full(100, 300), 4096)
    assert len(parts) == 8 and max(len(p) for p in parts) - min(len(p) for p in parts) <= 1  # balanced


def write_pairs(prefix, lengths, seed=0):
    rng = np.random.default_rng(seed)
    w = MMapIndexedWriter(str(prefix), np.int32)
    for lc, lr in lengths:
        w.add_document(rng.integers(1, 300, lc))
        w.add_document(rng.integers(1, 300, lr))
    w.finish()
    return str(prefix)


def test_collate_packed_layout(tmp_path):
    ds = PairDataset([write_pairs(tmp_path / "d", [(5, 7), (30, 3), (4, 4)])], seq_length=20)
    assert ds.pair_tokens.tolist() == [12, 23, 8]
    b = collate_packed(ds, [1, 0], pad_id=0, pad_to_multiple=16)
    assert b.input_ids.shape == (1, 48) and b.doc_lengths.tolist() == [20, 3, 5, 7, 13]
    assert b.tokens == 35 and b.padded_tokens == 48 and b.pairs == 2
    c, r = ds.pair(0)
    assert b.input_ids[0, 23:28].tolist() == c.tolist() and b.input_ids[0, 28:35].tolist() == r.tolist()
    pad = collate(ds, [1, 0], pad_id=0)
    assert pad.lengths.tolist() == [20, 3, 5, 7]


@pytest.mark.parametrize("name", ["gpt2b_like", "llama_like"])
def test_trainer_step_packed_equals_padded(tmp_path, name):
    rng = np.random.default_rng(1)
    lengths = [(int(a), int(b)) for a, b in rng.integers(2, 60, (48, 2))]
    ds = PairDataset([write_pairs(tmp_path / "d", lengths)], seq_length=48)
    optim = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.98],
             "sched": {"name": "CosineAnnealing", "warmup_steps": 0, "constant_steps": 10, "min_lr": 1e-4}}
    results = []
    for packing in (False, True):
        s = LoopSettings(global_batch_size=16, micro_batch_size=4, max_steps=2, packing=packing, packed_tokens=400,
                         packed_attention="mask")
        tr = RMTrainer(tiny(**CONFIGS[name]), optim, s, ds, ds, 0, str(tmp_path / f"run{packing}"), torch.device("cpu"))
        steps = [tr.train_step(i) for i in range(2)]
        val = tr.evaluate(ds, 1.0)
        results.append((steps, val, {k: p.detach().clone() for k, p in tr.module.named_parameters()}))
    (s0, v0, p0), (s1, v1, p1) = results
    for a, b in zip(s0, s1):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["pairs"] == b["pairs"] == 16
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert b["padding_efficiency"] > a["padding_efficiency"] - 0.3
    assert v0["loss"] == pytest.approx(v1["loss"], rel=1e-5) and v0["pairs"] == v1["pairs"] == 48
    for k in p0:
        torch.testing.assert_close(p1[k], p0[k], rtol=1e-4, atol=1e-5, msg=k)
