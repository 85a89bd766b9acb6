"""SFT, DPO and critic-free advantages against values computed by hand (the numbers are written here),
and packed micro-batches equal to padded ones on a real tiny GPT (the loss never crosses samples)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpo import data as dd
from dpo.loss import metrics, pair_sums, preference_loss, sequence_logps
from ppo.advantages import critic_free_advantages, grpo_advantages, rloo_advantages, sequence_rewards
from sft import data as sd
from sft.loss import batch_nll_sum, token_nll


# --- SFT ---------------------------------------------------------------------------------------

def test_token_nll_by_hand():
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e9]])
    nll = token_nll(logits, torch.tensor([1, 0]))
    # uniform over 3: ln 3; [1, 3, 0] / 4 with target 0: ln 4
    assert nll.tolist() == pytest.approx([1.0986123, 1.3862944], abs=1e-6)


def test_hh_dialogue_is_cut_into_turns_with_loss_on_the_assistant_only():
    text = "User: hi\n\nAssistant: hello there\n\nUser: bye\n\nAssistant: ciao"
    assert sd.hh_segments(text) == [("User: hi\n\nAssistant:", False), (" hello there", True),
                                    ("\n\nUser: bye\n\nAssistant:", False), (" ciao", True)]
    assert sd.template_segments({"input": "Q?", "output": "A."}, "Q: {input}\nA: {output}", "output") == \
        [("Q: Q?\nA: ", False), ("A.", True)]


class CharTok:
    """A real tokenizer would do; one id per character keeps the expected masks readable."""
    eos_id, bos_id, pad_id, vocab_size = 1, 2, 0, 300

    def encode(self, text):
        return [3 + (ord(c) % 290) for c in text]


def test_tokenized_sample_masks_prompts_and_keeps_eos_as_a_target():
    ids, loss = sd.tokenize_segments(CharTok(), [("ab", False), ("cd", True)], add_bos=True, add_eos=True)
    assert ids.tolist() == [2, 3 + 97, 3 + 98, 3 + 99, 3 + 100, 1]
    assert loss.tolist() == [False, False, False, True, True, True]
    _, every = sd.tokenize_segments(CharTok(), [("ab", False), ("cd", True)], answer_only_loss=False)
    assert every.tolist() == [True] * 5


def test_overlong_and_empty_samples_are_truncated_or_counted():
    recs = [("f", 1, [("abcdef", False), ("gh", True)]), ("f", 3, [("abcdefghij", False), ("k", True)])]
    ds = sd.build_dataset(CharTok(), recs, max_seq_length=8, truncation_method="left")
    assert len(ds) == 2 and ds.stats["truncated"] == 2 and ds.lengths.tolist() == [8, 8]
    right = sd.build_dataset(CharTok(), recs, max_seq_length=8, truncation_method="right", add_eos=False)
    assert len(right) == 1 and right.stats["skipped"] == {"no_target_tokens": 1}  # the response was cut away
    assert right.stats["skipped_where"]["no_target_tokens"] == ["f line 3"]


def _tiny_lm():
    from modeling import build_model
    from modeling.config import ModelConfig

    torch.manual_seed(0)
    return build_model(ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4), 300).eval()


def _packed_docs(batch):
    from modeling.layers import pack_documents

    return pack_documents(batch.doc_lengths, tuple(batch.input_ids.shape), "mask", real=batch.samples)


def test_packed_sft_loss_equals_padded_and_never_crosses_samples():
    rng = np.random.default_rng(0)
    ids = [rng.integers(3, 300, n) for n in (9, 4, 13, 6)]
    loss = [np.arange(n) >= n // 2 for n in (9, 4, 13, 6)]
    ds = sd.SFTDataset(ids, loss)
    assert ds.targets.tolist() == [5, 2, 7, 3]  # loss[1:]
    model = _tiny_lm()
    with torch.no_grad():
        pad = sd.collate(ds, [0, 1, 2, 3], pad_id=0)
        s_pad, n_pad = batch_nll_sum(model, pad.input_ids, pad.target_mask)
        packed = sd.collate_packed(ds, [0, 1, 2, 3], pad_id=0, pad_to_multiple=16)
        s_pack, n_pack = batch_nll_sum(model, packed.input_ids, packed.target_mask, _packed_docs(packed))
    assert int(n_pad) == int(n_pack) == 17 == int(ds.targets.sum())
    assert float(s_pack) == pytest.approx(float(s_pad), rel=1e-5)
    # the last token of each sample has no target: sample 0 ends at 8, sample 1 (4 tokens) at 12
    assert packed.target_mask[0, 8] == 0 and packed.target_mask[0, 12] == 0 and packed.target_mask[0, 7] == 1


def test_packing_fills_rows_within_the_budget():
    lengths = np.array([10, 3, 7, 5, 30])
    rows = sd.pack_samples(np.arange(5), lengths, 16)
    assert sorted(int(k) for r in rows for k in r) == [0, 1, 2, 3, 4]
    assert all(lengths[r].sum() <= 16 or len(r) == 1 for r in rows) and len(rows) == 3


# --- DPO ---------------------------------------------------------------------------------------

C, R, BETA = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5]), 0.5  # delta = [1, -1]


def test_dpo_and_ipo_by_hand():
    # -log sigmoid(0.5) = log(1 + e^-0.5); -log sigmoid(-0.5) = log(1 + e^0.5)
    assert preference_loss(C, R, BETA, "dpo").tolist() == pytest.approx([0.4740770, 0.9740770], abs=1e-6)
    # (delta - 1 / (2 beta))^2 = (1 - 1)^2, (-1 - 1)^2
    assert preference_loss(C, R, BETA, "ipo").tolist() == pytest.approx([0.0, 4.0], abs=1e-6)


def test_rpo_variants_by_hand():
    gc, gr = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0])
    # (beta delta - (g_c - g_r))^2 = (0.5 - 1)^2, (-0.5 - 1)^2
    assert preference_loss(C, R, BETA, "rpo_sq", gc, gr).tolist() == pytest.approx([0.25, 2.25], abs=1e-6)
    # alpha = sigmoid(1) = 0.7310586, beta_hat = sigmoid(0.5) = 0.6224593 (pair 1), sigmoid(-0.5) (pair 2):
    # a ln(a/b) + (1-a) ln((1-a)/(1-b))
    assert preference_loss(C, R, BETA, "rpo_bwd_kl", gc, gr).tolist() == pytest.approx([0.0263446, 0.2574032], abs=1e-6)
    # b ln(b/a) + (1-b) ln((1-b)/(1-a))
    assert preference_loss(C, R, BETA, "rpo_fwd_kl", gc, gr).tolist() == pytest.approx([0.0279550, 0.2728737], abs=1e-6)
    with pytest.raises(ValueError, match="preference_loss='kto'"):
        preference_loss(C, R, BETA, "kto")


def test_implicit_reward_metrics_by_hand():
    losses = preference_loss(C, R, BETA, "dpo")
    m = metrics(torch.stack(list(pair_sums(C, R, BETA, losses, losses, torch.zeros(2)).values())).tolist())
    assert m["accuracy"] == 0.5 and m["pairs"] == 2
    assert m["implicit_reward_chosen"] == pytest.approx(0.125)  # 0.5 * mean(1, -0.5)
    assert m["implicit_reward_rejected"] == pytest.approx(0.125)  # 0.5 * mean(0, 0.5)
    assert m["margin"] == pytest.approx(0.0) and m["loss"] == pytest.approx(0.724077, abs=1e-6)


def test_sequence_logps_sum_and_mean():
    lp, idx = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0]), torch.tensor([0, 0, 1, 1, 1])
    assert sequence_logps(lp, idx, 2).tolist() == [-3.0, -12.0]
    assert sequence_logps(lp, idx, 2, average=True).tolist() == [-1.5, -4.0]


def test_prompt_of_a_comparison_pair():
    c = "User: q\n\nAssistant: a\n\nUser: q2\n\nAssistant: I can help"
    r = "User: q\n\nAssistant: a\n\nUser: q2\n\nAssistant: I cannot"
    assert dd.split_prompt(c, r) == ("User: q\n\nAssistant: a\n\nUser: q2\n\nAssistant:", " I can help", " I cannot")
    assert dd.split_prompt("User: a", "User: b") is None


def test_dpo_packed_logps_equal_padded_chosen_and_rejected_in_one_pass():
    rng = np.random.default_rng(1)
    P = [rng.integers(3, 300, n) for n in (5, 2, 8)]
    Cc = [rng.integers(3, 300, n) for n in (3, 6, 2)]
    Rr = [rng.integers(3, 300, n) for n in (4, 1, 5)]
    ds = dd.PairSet(P, Cc, Rr)
    model = _tiny_lm()
    with torch.no_grad():
        pad = dd.collate(ds, [0, 1, 2], pad_id=0)
        assert pad.input_ids.shape[0] == 6 and int(pad.target_mask.sum()) == 3 + 4 + 6 + 1 + 2 + 5
        a = dd.sequence_logps(model, pad)
        packed = dd.collate_packed(ds, [0, 1, 2], pad_id=0, pad_to_multiple=16)
        from modeling.layers import pack_documents

        docs = pack_documents(packed.doc_lengths, tuple(packed.input_ids.shape), "mask", real=6)
        b = dd.sequence_logps(model, packed, documents=docs)
    assert b.tolist() == pytest.approx(a.tolist(), rel=1e-5)
    # the chosen response of pair 0 by hand: tokens 5..7 of [prompt0 + chosen0] from one forward pass
    with torch.no_grad():
        seq = torch.from_numpy(np.concatenate([P[0], Cc[0]]))[None]
        lp = model(seq)[0, :-1].float().log_softmax(-1).gather(-1, seq[0, 1:, None]).squeeze(-1)
    assert float(a[0]) == pytest.approx(float(lp[4:].sum()), rel=1e-5)


def test_comparison_jsonl_pairs_and_skips(tmp_path):
    import json

    f = tmp_path / "train_comparisons.jsonl"
    lines = [{"text": "User: q\n\nAssistant: yes"}, {"text": "User: q\n\nAssistant: no"},
             {"text": "User: z\n\nAssistant: same"}, {"text": "User: z\n\nAssistant: same"}, "oops"]
    f.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines))
    ds = dd.load_pairs(CharTok(), [str(f)], seq_length=64, name="train")
    assert len(ds) == 1 and ds.stats["skipped"] == {"identical_responses": 1, "bad_json": 1}
    assert ds.stats["skipped_where"]["bad_json"] == [f"{f} line 5"]


# --- GRPO / RLOO -------------------------------------------------------------------------------

def test_grpo_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 4.0])
    # group 1: mean 2, sample std 1; group 2: mean 4/3, sample std 4 / sqrt(3)
    assert grpo_advantages(r, 3).tolist() == pytest.approx([-1.0, 0.0, 1.0, -0.5773503, -0.5773503, 1.1547005], abs=1e-5)
    assert grpo_advantages(r, 3, scale_rewards=False).tolist() == pytest.approx([-1, 0, 1, -4 / 3, -4 / 3, 8 / 3], abs=1e-6)
    assert grpo_advantages(torch.tensor([2.0, 2.0]), 2).tolist() == [0.0, 0.0]  # equal rewards: no signal, no nan


def test_rloo_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 4.0])
    # r_i - mean of the other two: 1 - 2.5, 2 - 2, 3 - 1.5; 0 - 2, 0 - 2, 4 - 0
    assert rloo_advantages(r, 3).tolist() == pytest.approx([-1.5, 0.0, 1.5, -2.0, -2.0, 4.0], abs=1e-6)
    with pytest.raises(ValueError, match="groups of 4"):
        rloo_advantages(r, 4)


def test_kl_enters_the_sequence_reward_and_advantages_cover_response_tokens():
    scores = torch.tensor([1.0, 0.0])
    kl = torch.tensor([[0.5, 0.5, 9.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # 1 - 0.1 * (0.5 + 0.5) = 0.9; 0 - 0.1 * 1 = -0.1 (the masked 9.0 is not a response token)
    assert sequence_rewards(scores, kl, mask, 0.1).tolist() == pytest.approx([0.9, -0.1])
    adv = critic_free_advantages("rloo", scores, kl, mask, 0.1, 2)
    assert adv.flatten().tolist() == pytest.approx([1.0, 1.0, 0.0, -1.0, 0.0, 0.0])
