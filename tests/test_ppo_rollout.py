"""Rollout pieces on the tiny models: log-probs on the response only equal a full forward, the
padded vocab is never sampled, prompt batches are a pure function of the step, bf16 masters."""
from __future__ import annotations

import json

import torch

from modeling import ValueModel, build_model, presets
from ppo.data import PromptDataset
from ppo.models import MasterWeights, frozen_copy, mask_padded_vocab
from ppo.rollout import EndCondition, generate_responses, response_mask, token_logprobs
from ppo.config import LengthParams, SamplingParams


class Tok:
    vocab_size, eos_id, pad_id, bos_id = 90, 1, 0, None

    def encode(self, s):
        return [2 + (ord(c) % 80) for c in s]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return "".join(chr(48 + i % 60) for i in ids)


def tiny(seed=0):
    torch.manual_seed(seed)
    return build_model(presets.tiny_gpt(), vocab_size=96).eval()  # padded to 96, tokenizer has 90


def test_token_logprobs_equal_full_forward_and_entropy():
    model = tiny()
    tokens = torch.randint(2, 90, (3, 11))
    plen = torch.tensor([4, 2, 6])
    lengths = torch.tensor([11, 7, 9])
    mask = response_mask(plen, lengths, 10)
    assert mask[0].tolist() == [0, 0, 0] + [1] * 7 and mask[1].tolist() == [0] + [1] * 5 + [0] * 4
    lp, ent = token_logprobs(model, tokens, mask, with_entropy=True, chunk_tokens=4)
    with torch.no_grad():
        full = model(tokens)[:, :-1].float().log_softmax(-1)
    ref = full.gather(2, tokens[:, 1:, None]).squeeze(2) * mask
    torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)
    ref_ent = -(full.exp() * full).sum(-1) * mask
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)


def test_padded_vocab_never_sampled_and_reference_is_independent():
    model = tiny(1)
    ref = frozen_copy(model)
    for m in (model, ref):
        mask_padded_vocab(m, 90)
    with torch.no_grad():
        model.language_model.output_layer.weight[90:] += 50.0  # make the padding the most likely ids
    out = generate_responses(model, [[5, 6, 7], [8]], micro_batch_size=2, sampling=SamplingParams(end_strings=[]),
                             length=LengthParams(max_length=20, min_length=20), end=EndCondition(Tok(), []),
                             eos_id=1, pad_id=0, generator=torch.Generator().manual_seed(0))
    gen = torch.cat([out.tokens[0, 3:23], out.tokens[1, 1:21]])
    assert int(gen.max()) < 90
    lp, ent = token_logprobs(model, out.tokens, out.mask, with_entropy=True)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    # the reference kept the original weights (a real copy, its own logits mask)
    assert not torch.equal(ref.language_model.output_layer.weight, model.language_model.output_layer.weight)


def test_end_strings_split_into_token_ids_and_text():
    class T(Tok):
        def encode(self, s):
            return [7] if s == "<eos>" else [3, 4]

        def decode(self, ids):
            return "<eos>" if list(ids) == [7] else "x"

    end = EndCondition(T(), ["<eos>", "<|endoftext|>"])
    assert end.token_ids == [7] and end.strings == ["<|endoftext|>"]


def test_prompt_batches_pure_function_of_step_and_sharded(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps({"text": f"User: q{i}" + " long" * (i % 5) + "\n\nAssistant:"}) + "\n"
                         for i in range(10)))
    a = PromptDataset([str(p)], Tok(), max_prompt_tokens=20, seed=3)
    b = PromptDataset([str(p)], Tok(), max_prompt_tokens=20, seed=3)
    assert a.truncated > 0 and all(len(x) <= 20 for x in a.prompts)
    assert all(x[-1] == Tok().encode(":")[0] for x in a.prompts)  # the end ("Assistant:") is kept
    assert [a.batch(s, 4) for s in range(6)] == [b.batch(s, 4) for s in range(6)]
    # 10 prompts, 4 per step: steps 0, 1 and half of 2 are epoch 0, each prompt once per epoch
    first_epoch = a.indices(0, 10)
    assert sorted(first_epoch) == list(range(10))
    assert a.batch(1, 4, rank=0, world=2) + a.batch(1, 4, rank=1, world=2) == a.batch(1, 4)


def test_master_weights_keep_small_updates_that_bf16_would_lose():
    torch.manual_seed(0)
    model = ValueModel(presets.tiny_gpt(), 96).to(torch.bfloat16)
    mw = MasterWeights(model)
    assert mw.mixed and all(m.dtype == torch.float32 for m in mw.master)
    opt = torch.optim.SGD(mw.master, lr=1e-4)
    before = [m.detach().clone() for m in mw.master]
    x = torch.randint(0, 96, (2, 8))
    for _ in range(3):
        model(x).float().pow(2).mean().backward()
        assert all(p.grad is None for p in model.parameters())  # moved to the fp32 masters by the hook
        opt.step()
        opt.zero_grad(set_to_none=True)
        mw.sync()
    moved = sum(int((m != b).sum()) for m, b in zip(mw.master, before))
    assert moved > 0
    for p, m in zip(mw.params, mw.master):
        assert torch.equal(p, m.to(torch.bfloat16))


def test_score_fills_every_field_and_standardizes_rewards():
    from modeling import RewardModel
    from ppo.config import RewardStandardization
    from ppo.rollout import score

    actor = tiny(2)
    ref = frozen_copy(actor)
    torch.manual_seed(3)
    critic, reward = ValueModel(presets.tiny_gpt(), 96), RewardModel(presets.tiny_gpt(), 96).eval()
    batch = generate_responses(actor, [[5, 6, 7], [8], [9, 10]], micro_batch_size=2,
                               sampling=SamplingParams(end_strings=[]), length=LengthParams(max_length=6, min_length=1),
                               end=EndCondition(Tok(), []), eos_id=1, pad_id=0, generator=torch.Generator().manual_seed(0))
    timers = {}
    score(batch, actor=actor, reference=ref, critic=critic, reward=reward, micro_batch_size=2,
          standardize=RewardStandardization(enable=True, mean=1.0, std=2.0), timers=timers)
    torch.testing.assert_close(batch.logprobs, batch.ref_logprobs)  # the reference is the initial policy
    assert ((batch.values != 0) <= batch.mask.bool()).all() and timers["scoring"] > 0
    with torch.no_grad():
        raw = reward(batch.tokens, lengths=batch.lengths)
    torch.testing.assert_close(batch.scores, raw)
    torch.testing.assert_close(batch.rewards, (raw - 1.0) / 2.0)
