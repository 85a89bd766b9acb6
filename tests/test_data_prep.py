"""The prep stage through its entry, `data_prep.run(cfg)`, as the launcher calls it."""
import json
import os

import numpy as np
import pytest
from omegaconf import OmegaConf

import data_prep
from data_prep.config import DataConfig
from data_prep.indexed import read_index
from data_prep.tokenizers import load_tokenizer
from modeling.config import ModelConfig


def make_cfg(stage_dir, **data):
    return OmegaConf.create({"data": OmegaConf.structured(DataConfig(**data)),
                             "model": OmegaConf.structured(ModelConfig()),
                             "run": {"stage_dir": str(stage_dir)}})


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("prep")
    return d, data_prep.run(make_cfg(d))


def test_artifacts_contract(sample_run):
    d, art = sample_run
    assert set(art) == {"data_prefix", "prompts", "comparisons", "tokenizer", "report"}
    p = str(d)
    assert art["data_prefix"] == {"train": f"{p}/hh_comparison_train_text_document",
                                  "validation": f"{p}/hh_comparison_test_text_document",
                                  "test": f"{p}/hh_comparison_test_text_document"}
    assert art["prompts"] == {"train": f"{p}/train_prompts.jsonl",
                              "validation": f"{p}/test_prompts.jsonl", "test": f"{p}/test_prompts.jsonl"}
    assert art["comparisons"] == {"train": f"{p}/train_comparisons.jsonl",
                                  "test": f"{p}/test_comparisons.jsonl"}
    assert art["tokenizer"] == f"{p}/tokenizer.model" and os.path.isfile(art["tokenizer"])
    for prefix in art["data_prefix"].values():
        assert os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")
    assert not [n for n in os.listdir(d) if ".tmp" in n]


def test_sample_pairs_and_report(sample_run):
    d, art = sample_run
    rep = json.load(open(art["report"]))
    for split, n in (("train", 640), ("test", 160)):
        s = rep["splits"][split]
        assert s["jsonl"]["records_read"] == s["jsonl"]["pairs_kept"] == n
        assert s["jsonl"]["dropped"]["total"] == 0
        assert s["mmap"]["documents"] == 2 * n and s["mmap"]["tokens"] > 10 * n
        _, sizes, _, doc_idx = read_index(art["data_prefix"][split])
        assert len(sizes) == 2 * n and doc_idx[-1] == 2 * n  # pair i = documents 2i, 2i+1
    assert rep["tokenizer"]["trained"] and rep["tokenizer"]["library"] == "sentencepiece"
    assert rep["seconds"] >= 0


def test_comparisons_alternate_chosen_rejected(sample_run):
    d, art = sample_run
    prompts = [json.loads(x)["text"] for x in open(art["prompts"]["test"]).read().split("\n")]
    comps = [json.loads(x)["text"] for x in open(art["comparisons"]["test"]).read().split("\n")]
    assert len(comps) == 2 * len(prompts)
    for i, prompt in enumerate(prompts):
        assert prompt.endswith("Assistant:")
        assert comps[2 * i].startswith(prompt) and comps[2 * i + 1].startswith(prompt)
        assert comps[2 * i] != comps[2 * i + 1]


def test_tokenizer_roundtrip_and_ids_in_mmap(sample_run):
    d, art = sample_run
    tok = load_tokenizer(art["tokenizer"])
    text = json.loads(open(art["comparisons"]["train"]).readline())["text"]
    assert tok.decode(tok.encode(text)) == text  # newlines survive: the policy sees real turns
    assert tok.encode_batch([text, "x"])[0] == tok.encode(text)
    assert tok.eos_id == 2 and tok.bos_id == 1 and tok.pad_id == 3
    _, sizes, pointers, _ = read_index(art["data_prefix"]["train"])
    first = np.fromfile(art["data_prefix"]["train"] + ".bin", dtype=np.uint16, count=int(sizes[0]))
    assert first.tolist() == tok.encode(text) + [tok.eos_id]


def test_rerun_reuses_outputs(sample_run, caplog):
    d, art = sample_run
    before = {n: os.stat(os.path.join(d, n)).st_mtime_ns for n in os.listdir(d)}
    caplog.set_level("INFO")
    again = data_prep.run(make_cfg(d))
    assert again == art
    rep = json.load(open(art["report"]))
    assert all(s["jsonl"]["reused"] and s["mmap"]["reused"] for s in rep["splits"].values())
    for name in ("hh_comparison_train_text_document.bin", "train_comparisons.jsonl", "tokenizer.model"):
        assert os.stat(os.path.join(d, name)).st_mtime_ns == before[name]


def test_sample_is_deterministic(tmp_path):
    """The committed sample is what make_sample.py writes."""
    import importlib.util

    here = os.path.join(os.path.dirname(data_prep.__file__), "sample")
    spec = importlib.util.spec_from_file_location("make_sample", os.path.join(here, "make_sample.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name, n, seed in (("train", 640, 20240601), ("test", 160, 20240602)):
        mod.write(str(tmp_path / name), n, seed)
        assert (tmp_path / name).read_bytes() == open(os.path.join(here, f"{name}.jsonl.gz"), "rb").read()
    assert os.path.getsize(os.path.join(here, "train.jsonl.gz")) < 200_000


def test_conf_yaml_sets_only_dataconfig_keys():
    path = os.path.join(os.path.dirname(data_prep.__file__), "..", "conf", "data", "hh_rlhf.yaml")
    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(path))
    assert merged.source == "sample"


def test_sample_preference_is_learnable(sample_run):
    """A bag-of-tokens reward (Bradley-Terry, numpy) learns the sample's preference from the train
    mmap pairs and ranks held-out test pairs: the signal a 2-layer reward model picks up."""
    d, art = sample_run
    vocab = load_tokenizer(art["tokenizer"]).vocab_size

    def pair_features(prefix):
        _, sizes, pointers, _ = read_index(prefix)
        tokens = np.fromfile(prefix + ".bin", dtype=np.uint16)
        bags = np.zeros((len(sizes), vocab))
        for i, (n, p) in enumerate(zip(sizes, pointers // 2)):
            np.add.at(bags[i], tokens[p:p + n], 1.0)
        return bags[0::2] - bags[1::2]  # chosen - rejected, pair i = documents 2i, 2i+1

    x_train, x_test = pair_features(art["data_prefix"]["train"]), pair_features(art["data_prefix"]["test"])
    w = np.zeros(vocab)
    accuracy = lambda x: float(((x @ w) > 0).mean())
    for _ in range(100):  # gradient ascent on mean log sigmoid(r_chosen - r_rejected)
        margin = x_train @ w
        w += 0.1 * x_train.T @ (1 / (1 + np.exp(margin))) / len(x_train)
    assert accuracy(x_test) > 0.95
