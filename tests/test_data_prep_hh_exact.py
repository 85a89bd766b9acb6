"""The JSONL step against the hands-on's own `process_anthropic_hh.py`, byte for byte.

The reference is the script text cut out of the seed document at test time and executed, with
`load_dataset` swapped for the local HH file (the only thing that differs offline). Nothing on the
reference side comes from data_prep.
"""
import gzip
import json
import textwrap
from pathlib import Path

import pytest

from data_prep.config import DataConfig
from data_prep.stage import prep_jsonl

SHARED = Path(__file__).resolve().parents[2] / "shared"
SEED = SHARED / "seed" / "000_d0a299e461d51692.txt"
HH_TEST = SHARED / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"

pytestmark = pytest.mark.skipif(not (SEED.exists() and HH_TEST.exists()),
                                reason="../shared seed or HH data missing")


def seed_script() -> str:
    text = SEED.read_text(encoding="utf-8")
    start = text.index('"""A script to process the Anthropic Dataset"""')
    start = text.rindex("\n", 0, start) + 1  # keep the line's indentation for dedent
    end = text.index("```", start)
    return textwrap.dedent(text[start:end])


def run_seed(records, split, out_dir):
    """The hands-on's process_hh + save_dataset on `records` (a list of {"chosen","rejected"})."""
    ns = {"__name__": "process_anthropic_hh"}
    exec(compile(seed_script(), "process_anthropic_hh.py", "exec"), ns)
    columns = {"chosen": [r["chosen"] for r in records], "rejected": [r["rejected"] for r in records]}
    ns["load_dataset"] = lambda name: {"test": columns, "train": columns}
    with pytest.warns(UserWarning) if split == "validation" else _nothing():
        pairs = ns["process_hh"](split)
    ns["save_dataset"](pairs, split, str(out_dir))
    return pairs


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def load_hh(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_seed_script_is_extracted():
    src = seed_script()
    assert "def convert_string_format(string):" in src and "def save_dataset(" in src


@pytest.mark.parametrize("split", ["test", "validation"])
def test_jsonl_matches_hands_on_byte_for_byte(tmp_path, split):
    records = load_hh(HH_TEST)
    assert len(records) == 2312
    ref_dir, our_dir = tmp_path / "ref", tmp_path / "ours"
    ref_dir.mkdir(), our_dir.mkdir()
    pairs = run_seed(records, split, ref_dir)
    assert len(pairs) == 2303

    data = DataConfig(source="local", path=str(HH_TEST))
    rep = prep_jsonl(data, str(our_dir), split)
    assert (rep["records_read"], rep["pairs_kept"]) == (2312, 2303)
    assert rep["dropped"]["total"] == 9
    for name in (f"{split}_prompts.jsonl", f"{split}_comparisons.jsonl"):
        ref, ours = (ref_dir / name).read_bytes(), (our_dir / name).read_bytes()
        assert ours == ref, name
        assert not ours.endswith(b"\n")  # the hands-on's "\n".join
    # every drop is named with its line: the hands-on drops these 9 silently
    lines = rep["dropped"]["lines"]
    assert sum(len(v) for by_src in lines.values() for v in by_src.values()) == 9


def test_edge_cases_match_hands_on(tmp_path):
    """Quirks kept on purpose: transcripts without turns, prompt mismatch, odd splits, unicode."""
    records = [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
        {"chosen": "", "rejected": ""},  # no turns, and chosen == rejected: the hands-on keeps it, the kit drops it
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: b"},
        {"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: a\n\nAssistant: b"},
        {"chosen": "\n\nHuman: x\n\nAssistant: y\n\nAssistant: z", "rejected": "\n\nHuman: x\n\nAssistant: y"},
        {"chosen": "Human: no leading\n\nAssistant: ok", "rejected": "Human: no leading\n\nAssistant: ko"},
        {"chosen": "\n\nHuman: café ☕ \"q\"\n\nAssistant: 日本\n\nHuman: more\n\nAssistant: yes",
         "rejected": "\n\nHuman: café ☕ \"q\"\n\nAssistant: 日本\n\nHuman: more\n\nAssistant: no"},
    ]
    src = tmp_path / "edge.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    (tmp_path / "ref").mkdir(), (tmp_path / "ours").mkdir(), (tmp_path / "all").mkdir()
    assert len(run_seed(records, "test", tmp_path / "all")) == 4
    # the one deliberate difference (issue 18): a pair with chosen == rejected teaches nothing and is dropped
    pairs = run_seed([r for r in records if r["chosen"] != r["rejected"]], "test", tmp_path / "ref")
    rep = prep_jsonl(DataConfig(source="local", path=str(src)), str(tmp_path / "ours"), "test")
    assert rep["pairs_kept"] == len(pairs) == 3
    assert rep["dropped"]["by_reason"] == {"chosen_equals_rejected": 1, "prompt_mismatch": 1,
                                           "chosen_turns_do_not_split": 2}
    assert rep["identical_pairs_dropped"] == 1
    for name in ("test_prompts.jsonl", "test_comparisons.jsonl"):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
