"""Sources (local file, HH folder, hub), malformed input, atomic outputs, the CLI."""
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import data_prep
from data_prep.config import DataConfig, DataTokenizerConfig
from data_prep.stage import prep_jsonl
from data_prep.tokenizers import train_sentencepiece
from modeling.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
HH_TEST = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
SAMPLE = ROOT / "data_prep" / "sample"


def pair(i, a="good", b="bad"):
    p = f"\n\nHuman: question {i}\n\nAssistant:"
    return {"chosen": f"{p} {a} {i}", "rejected": f"{p} {b} {i}"}


def write_gz(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(b"\n".join(x if isinstance(x, bytes) else json.dumps(x).encode() for x in lines))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"User: question {i}\n\nAssistant: good {i} bad" for i in range(200)]
    return train_sentencepiece(iter(texts), 320, str(tmp_path_factory.mktemp("t") / "t.model"))


def cfg_for(stage_dir, tok=None, **data):
    if tok:
        data["tokenizer"] = DataTokenizerConfig(model=tok)
    return OmegaConf.create({"data": OmegaConf.structured(DataConfig(**data)),
                             "model": OmegaConf.structured(ModelConfig()),
                             "run": {"stage_dir": str(stage_dir)}})


def test_hh_folder_layout_and_subsets(tmp_path, tok):
    hh = tmp_path / "hh"
    for subset, n in (("helpful-base", 3), ("harmless-base", 5)):
        for split in ("train", "test"):
            write_gz(hh / subset / f"{split}.jsonl.gz", [pair(f"{subset}{split}{i}") for i in range(n)])
    (hh / "red-team-attempts").mkdir()  # HH's folder without train/test files: not a subset
    art = data_prep.run(cfg_for(tmp_path / "all", tok, source="local", path=str(hh)))
    comps = open(art["comparisons"]["train"]).read().split("\n")
    assert len(comps) == 16 and "harmless-basetrain0" in comps[0]  # subsets in sorted order
    assert "helpful-basetrain0" in comps[10]
    one = data_prep.run(cfg_for(tmp_path / "one", tok, source="local", path=str(hh),
                                subsets=["helpful-base"]))
    assert len(open(one["comparisons"]["test"]).read().split("\n")) == 6
    per_split = data_prep.run(cfg_for(tmp_path / "ps", tok, source="local",
                                      path=str(hh / "harmless-base" / "{split}.jsonl.gz")))
    assert json.load(open(per_split["report"]))["splits"]["train"]["jsonl"]["pairs_kept"] == 5


def test_local_missing_path_is_clear(tmp_path):
    with pytest.raises(ValueError, match="data.path"):
        data_prep.run(cfg_for(tmp_path, source="local"))
    with pytest.raises(FileNotFoundError):
        data_prep.run(cfg_for(tmp_path, source="local", path=str(tmp_path / "nope")))


def test_malformed_lines_are_counted_with_line_numbers(tmp_path):
    lines = [pair(1),                        # 1 ok
             b"{not json",                   # 2
             {"chosen": "x"},                # 3 missing rejected
             {"chosen": None, "rejected": "y"},  # 4
             b"",                            # 5 blank: not a record
             pair(2, "a\n\nAssistant: b"),   # 6 chosen does not split
             b"\xff\xfe{}",                  # 7 not UTF-8
             [1, 2],                         # 8 not an object
             {"chosen": "\n\nHuman: p\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: a"},  # 9
             pair(3)]                        # 10 ok
    src = tmp_path / "bad.jsonl.gz"
    write_gz(src, lines)
    rep = prep_jsonl(DataConfig(source="local", path=str(src)), str(tmp_path), "train")
    assert rep["pairs_kept"] == 2 and rep["records_read"] == 9
    where = {r: v[str(src)] for r, v in rep["dropped"]["lines"].items()}
    assert where == {"bad_json": [2], "missing_rejected": [3], "chosen_not_a_string": [4],
                     "chosen_turns_do_not_split": [6], "bad_utf8": [7], "not_an_object": [8],
                     "prompt_mismatch": [9]}
    assert rep["dropped"]["total"] == 7


def test_truncated_gzip_keeps_what_was_read(tmp_path):
    """With data.allow_truncated_input=true (issue 18: without it, a cut file fails the stage)."""
    src = tmp_path / "cut.jsonl.gz"
    write_gz(src, [pair(i, "x" * 200) for i in range(2000)])
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    rep = prep_jsonl(DataConfig(source="local", path=str(src), allow_truncated_input=True), str(tmp_path), "test")
    assert 0 < rep["pairs_kept"] < 2000
    assert rep["dropped"]["by_reason"] == {"unreadable_file": 1}


def test_hub_offline_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: offline
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(RuntimeError, match="data.source=local data.path="):
        data_prep.run(cfg_for(tmp_path, source="hub"))


@pytest.mark.skipif(not HH_TEST.exists(), reason="../shared HH data missing")
def test_hub_source_through_datasets(tmp_path, tok, monkeypatch):
    """The hub code path with the real `datasets.load_dataset`, on a folder laid out as the hub repo."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "hh-rlhf"
    (repo / "harmless-base").mkdir(parents=True)
    shutil.copyfile(HH_TEST, repo / "harmless-base" / "test.jsonl.gz")
    write_gz(repo / "harmless-base" / "train.jsonl.gz", [pair(i) for i in range(4)])
    art = data_prep.run(cfg_for(tmp_path / "out", tok, source="hub", hub_name=str(repo),
                                subsets=["harmless-base"]))
    local = tmp_path / "local"
    local.mkdir()
    prep_jsonl(DataConfig(source="local", path=str(HH_TEST)), str(local), "test")
    assert open(art["comparisons"]["test"], "rb").read() == (local / "test_comparisons.jsonl").read_bytes()
    rep = json.load(open(art["report"]))
    assert rep["splits"]["test"]["jsonl"]["pairs_kept"] == 2303


def test_interrupted_run_leaves_nothing_complete(tmp_path, tok, monkeypatch):
    import data_prep.to_mmap as to_mmap

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(to_mmap, "ids_to_arrays", boom)
    with pytest.raises(KeyboardInterrupt):
        data_prep.run(cfg_for(tmp_path, tok))
    names = os.listdir(tmp_path)
    assert not [n for n in names if n.endswith((".bin", ".idx", ".tmp")) or ".tmp-" in n]
    assert "report.json" not in names
    assert not [n for n in names if n.startswith("hh_comparison") and n.endswith("fingerprint.json")]
    monkeypatch.undo()
    art = data_prep.run(cfg_for(tmp_path, tok))  # the next run completes it
    assert os.path.isfile(art["data_prefix"]["train"] + ".bin")


def test_changed_input_is_not_reused(tmp_path, tok):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(pair(i)) for i in range(5)))
    out = tmp_path / "out"
    data_prep.run(cfg_for(out, tok, source="local", path=str(src)))
    src.write_text("\n".join(json.dumps(pair(i)) for i in range(7)))
    art = data_prep.run(cfg_for(out, tok, source="local", path=str(src)))
    rep = json.load(open(art["report"]))
    assert rep["splits"]["train"]["jsonl"]["pairs_kept"] == 7
    assert not rep["splits"]["train"]["mmap"]["reused"] and rep["splits"]["train"]["mmap"]["documents"] == 14


def test_cli_prep_and_preprocess_match(tmp_path, tok):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "data_prep", "--source", "local", "--path",
                        str(SAMPLE / "{split}.jsonl.gz"), "--output-dir", str(out),
                        "--tokenizer-model", tok, "--max-pairs", "50"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    art = json.loads(r.stdout)
    # the hands-on's second command, 1:1
    r = subprocess.run([sys.executable, "-m", "data_prep", "preprocess", "--input",
                        art["comparisons"]["train"], "--output-prefix", "./datasets/hh_comparison_train",
                        "--tokenizer-model", tok, "--tokenizer-library=sentencepiece",
                        "--json-keys", "text", "--dataset-impl", "mmap", "--workers", "2",
                        "--chunk_size=100", "--append-eod"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ours = tmp_path / "datasets" / "hh_comparison_train_text_document"
    for ext in (".bin", ".idx"):
        assert open(str(ours) + ext, "rb").read() == open(art["data_prefix"]["train"] + ext, "rb").read()


@pytest.mark.skipif(not HH_TEST.exists(), reason="../shared HH data missing")
def test_cli_convert_is_the_hands_on_script(tmp_path):
    """`python -m data_prep convert` = `python process_anthropic_hh.py --output-dir D`."""
    r = subprocess.run([sys.executable, "-m", "data_prep", "convert", "--source", "local", "--path",
                        str(HH_TEST), "--splits", "test", "--output-dir", str(tmp_path / "c")],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["test"]["pairs_kept"] == 2303
    assert (tmp_path / "c" / "test_comparisons.jsonl").stat().st_size > 0
