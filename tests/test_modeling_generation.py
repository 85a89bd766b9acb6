"""KV-cache generation equals full recomputation; sampling controls behave."""
from __future__ import annotations

import pytest
import torch

from modeling import build_model, generate, presets, sample_next
from modeling.layers import Norm

TINY_GPT, TINY_LLAMA = presets.tiny_gpt(), presets.tiny_llama()

PROMPTS = [[5, 17, 3, 9, 44, 2, 7], [8], [60, 61, 62, 63]]


def make(cfg, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg, vocab_size=100).eval()
    with torch.no_grad():  # norms start at 0 / 1; random ones exercise layernorm1p / rmsnorm weights
        for m in model.modules():
            if isinstance(m, Norm):
                m.weight.normal_(0, 0.3)
    return model


@torch.no_grad()
def recompute(model, prompt, n, ends=(), min_length=0):
    """Reference: full forward over the whole sequence for every new token, one row at a time."""
    seq, lps = list(prompt), []
    for t in range(n):
        logits = model(torch.tensor([seq]))[0, -1].double()
        if t < min_length:
            logits[list(ends)] = float("-inf")
        tok = int(logits.argmax())
        lps.append(float(logits.log_softmax(-1)[tok]))
        seq.append(tok)
        if tok in ends:
            break
    return seq, lps


@pytest.mark.parametrize("cfg", [TINY_GPT, TINY_LLAMA], ids=["gpt", "llama"])
def test_kv_cache_greedy_matches_recomputation(cfg):
    model = make(cfg)
    out = generate(model, PROMPTS, max_length=12, greedy=True, return_logprobs=True, pad_id=0)
    assert out.tokens.shape == (3, 7 + 12)
    for i, p in enumerate(PROMPTS):
        seq, lps = recompute(model, p, 12)
        n = int(out.lengths[i])
        assert n == len(seq) and out.tokens[i, :n].tolist() == seq
        assert (out.tokens[i, n:] == 0).all()
        torch.testing.assert_close(out.logprobs[i, len(p):n].double(), torch.tensor(lps, dtype=torch.double),
                                   rtol=1e-4, atol=1e-4)


def test_end_tokens_min_length_and_padded_tensor_input():
    model = make(TINY_LLAMA, seed=3)
    first = generate(model, PROMPTS, max_length=10, greedy=True)
    # make the 3rd generated token of row 0 an end token: generation stops there, end kept
    end = int(first.tokens[0, 7 + 2])
    out = generate(model, PROMPTS, max_length=10, greedy=True, eos_id=end, pad_id=0)
    seq, _ = recompute(model, PROMPTS[0], 10, ends=(end,))
    assert out.tokens[0, : int(out.lengths[0])].tolist() == seq and seq[-1] == end
    # min_length suppresses it
    out = generate(model, PROMPTS, max_length=10, min_length=10, greedy=True, eos_id=end)
    assert (out.lengths - out.prompt_lengths == 10).all()
    assert end not in out.tokens[0, 7:].tolist()
    seq, _ = recompute(model, PROMPTS[0], 10, ends=(end,), min_length=10)
    assert out.tokens[0].tolist() == seq
    # a padded tensor + lengths is the same as the list form
    padded = torch.zeros(3, 7, dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        padded[i, : len(p)] = torch.tensor(p)
    again = generate(model, padded, torch.tensor([7, 1, 4]), max_length=10, min_length=10, greedy=True, eos_id=end)
    assert torch.equal(again.tokens, out.tokens)


def test_end_strings_via_detokenize_callback():
    model = make(TINY_GPT, seed=1)
    first = generate(model, PROMPTS, max_length=8, greedy=True)
    detok = lambda ids: "".join(f"<{i}>" for i in ids)  # noqa: E731
    stop = f"<{int(first.tokens[1, 1 + 3])}>"
    out = generate(model, PROMPTS, max_length=8, greedy=True, end_strings=[stop], detokenize=detok)
    gen = out.tokens[1, 1: int(out.lengths[1])].tolist()
    assert detok(gen).endswith(stop) and len(gen) <= 4
    assert torch.equal(out.tokens[1, : int(out.lengths[1])], first.tokens[1, : int(out.lengths[1])])


def test_sampling_seeded_topk1_and_top_p():
    model = make(TINY_GPT, seed=2)
    a = generate(model, PROMPTS, max_length=6, temperature=0.7, top_k=20, top_p=0.9, seed=11)
    b = generate(model, PROMPTS, max_length=6, temperature=0.7, top_k=20, top_p=0.9, seed=11)
    assert torch.equal(a.tokens, b.tokens)
    g = generate(model, PROMPTS, max_length=6, greedy=True)
    assert torch.equal(generate(model, PROMPTS, max_length=6, top_k=1, seed=5).tokens, g.tokens)
    logits = torch.tensor([[3.0, 2.9, -5.0, -6.0]])
    draws = {int(sample_next(logits, top_p=0.5, generator=torch.Generator().manual_seed(s))) for s in range(30)}
    assert draws == {0}  # the top token alone already covers half the mass
    draws = {int(sample_next(logits, top_p=0.9, generator=torch.Generator().manual_seed(s))) for s in range(60)}
    assert draws == {0, 1}
