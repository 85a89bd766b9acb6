"""stage=eval: preference readers (bad lines counted with their numbers), the metrics, and the stage
end to end on CPU through the real launcher (prep -> rm -> eval, rm also exported to HF)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from data_prep.report import DropLog
from evaluation.metrics import bootstrap_ci, by_subset, wins
from evaluation.preferences import join, read_jsonl_pairs
from tests.kit import cli


class CharTokenizer:
    eos_id, pad_id = 0, 0

    def encode_batch(self, texts):
        return [[ord(c) % 250 + 1 for c in t] for t in texts]


def test_preference_file_mixed_layouts_bad_lines_counted_with_line_numbers(tmp_path):
    rows = [
        json.dumps({"prompt": "Is the sky blue?", "chosen": "Yes.", "rejected": "No, never.", "subset": "facts"}),
        "{not json",
        json.dumps({"prompt": "Hi", "chosen": "Hello!"}),                       # no rejected
        json.dumps({"prompt": "Hi", "chosen": 3, "rejected": "x"}),             # not a string
        json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}),
        json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: other\n\nAssistant: c"}),
        json.dumps({"prompt": "Q", "chosen": "x" * 500, "rejected": "y"}),      # overlong
        json.dumps([1, 2]),
        json.dumps({"prompt": "Q", "chosen": "a", "rejected": "b", "subset": "math"}),
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(rows) + "\n")
    drops = DropLog()
    pairs = read_jsonl_pairs(str(path), CharTokenizer(), 100, drops)
    assert [(p.line, p.subset) for p in pairs] == [(1, "facts"), (5, "all"), (9, "math")]
    assert drops.counts == {"bad_json": 1, "missing_rejected": 1, "chosen_not_a_string": 1, "prompt_mismatch": 1,
                            "overlong": 1, "not_an_object": 1}
    assert drops.where["missing_rejected"] == {"prefs.jsonl": [3]} and drops.where["overlong"] == {"prefs.jsonl": [7]}
    # texts as prep writes them, EOS appended
    assert pairs[0].chosen == CharTokenizer().encode_batch(["User: Is the sky blue?\n\nAssistant: Yes."])[0] + [0]
    assert pairs[1].chosen == CharTokenizer().encode_batch(["User: hi\n\nAssistant: hello"])[0] + [0]


def test_join_keeps_prep_layout_prompts_and_applies_templates():
    assert join("User: hi\n\nAssistant:", " yes", None) == "User: hi\n\nAssistant: yes"
    assert join("hi", "yes", "Q: {prompt}\nA: {response}") == "Q: hi\nA: yes"


def test_metrics_accuracy_interval_and_length_baseline():
    rng = np.random.default_rng(0)
    c, r = np.array([1.0, 2, 3, 0, 5]), np.array([0.0, 1, 4, 0, 1])
    assert wins(c, r).tolist() == [1, 1, 0, 0.5, 1]
    lo, hi = bootstrap_ci(np.ones(50), 200, rng)
    assert lo == hi == 1.0
    x = (rng.random(2000) < 0.7).astype(float)
    lo, hi = bootstrap_ci(x, 500, rng)
    assert lo < x.mean() < hi and 0.02 < hi - lo < 0.06  # about +-1.96 * sqrt(.21 / 2000)
    res = by_subset(["a", "a", "b", "b", "b"], c, r, np.array([3, 1, 1, 2, 2]), np.array([1, 1, 2, 2, 1]), 100, 0)
    assert res["overall"]["accuracy"] == pytest.approx(0.7) and res["a"]["accuracy"] == 1.0
    assert res["overall"]["longer_wins_accuracy"] == pytest.approx((1 + .5 + 0 + .5 + 1) / 5)
    assert res["b"]["pairs"] == 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalrun")
    r = cli("stage=prep,rm,eval", f"run.dir={d}", "export_hf=true")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "longer wins" in r.stdout  # the summary table is printed
    return d


def test_eval_stage_on_prep_test_split_equals_rm_test_metrics(run):
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    art = stages["eval"]["artifacts"]
    metrics = json.loads(open(art["rm_metrics"]).read())
    rm_test = json.loads((run / "rm" / "test_metrics.json").read_text())
    overall = metrics["results"]["overall"]
    assert overall["pairs"] == rm_test["pairs"] == 160
    assert overall["accuracy"] == pytest.approx(rm_test["accuracy"])
    assert overall["mean_margin"] == pytest.approx(rm_test["margin"], abs=1e-4)
    assert "longer_wins_accuracy" in overall and len(overall["accuracy_ci95"]) == 2
    assert sum(1 for _ in open(art["rm_rewards"])) == 160
    assert (run / "eval" / "rm_eval.png").stat().st_size > 10_000
    assert stages["rm"]["artifacts"]["hf"] == str(run / "rm" / "hf")


def test_exported_reward_model_in_transformers_scores_as_the_eval_stage(run):
    transformers = pytest.importorskip("transformers")
    import torch

    hf_dir = run / "rm" / "hf"
    model = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    texts = [json.loads(line)["text"] for line in open(run / "prep" / "test_comparisons.jsonl")][:8]
    with torch.no_grad():
        got = model(**tok(texts, padding=True, return_tensors="pt")).logits.squeeze(-1)
    rows = [json.loads(line) for line in open(run / "eval" / "rm_rewards.jsonl")][:4]
    want = torch.tensor([x for r in rows for x in (r["reward_chosen"], r["reward_rejected"])])
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_eval_on_a_file_of_your_own_reports_subsets_and_bad_lines(run, tmp_path):
    rows = [json.dumps({"prompt": f"Question {i}?", "chosen": "A helpful, careful answer." * (1 + i % 3),
                        "rejected": "No.", "subset": "ab"[i % 2]}) for i in range(12)]
    rows.insert(3, '{"prompt": "broken"')
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(rows))
    r = cli("stage=eval", f"run.dir={run}", f"eval.rm.data={path}", "eval.rm.bootstrap_samples=200")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    metrics = json.loads((run / "eval" / "rm_metrics.json").read_text())
    assert set(metrics["results"]) == {"overall", "a", "b"} and metrics["results"]["overall"]["pairs"] == 12
    assert metrics["skipped"]["by_reason"] == {"bad_json": 1} and metrics["skipped"]["lines"]["bad_json"] == {"mine.jsonl": [4]}
    assert "bad_json 1 (mine.jsonl line 4)" in r.stdout


def test_eval_dry_run_renders_a_slurm_job(tmp_path):
    import os
    import shutil

    env = {}
    if shutil.which("srun") is None:  # submitit only looks for srun to render; a dry run calls nothing
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
        (tmp_path / "bin" / "srun").chmod(0o755)
        env["PATH"] = f"{tmp_path / 'bin'}:{os.environ['PATH']}"
    r = cli("stage=eval", f"run.dir={tmp_path}", "cluster=slurm", "cluster.partition=gpu", "dry_run=true",
            "eval.rm.restore_from_path=/ckpt/rm.nemo", "eval.rm.data=/data/prefs.jsonl", env=env)
    assert r.returncode == 0, r.stderr
    assert "#SBATCH" in r.stdout and "--stage eval" in r.stdout and "data: /data/prefs.jsonl" in r.stdout


def _tiny_policy(run, path, seed, peaked=False):
    import torch

    from data_prep.tokenizers import load_tokenizer
    from modeling import build_model, presets, save_nemo

    tok_path = str(run / "prep" / "tokenizer.model")
    torch.manual_seed(seed)
    m = build_model(presets.tiny_gpt(), vocab_size=load_tokenizer(tok_path).vocab_size)
    if peaked:  # random init is near uniform; a larger output layer makes it a distribution of its own
        with torch.no_grad():
            m.language_model.output_layer.weight.mul_(300)
    return save_nemo(m, str(path), tokenizer_path=tok_path)


def test_policy_eval_against_its_reference(run, tmp_path):
    ref = _tiny_policy(run, tmp_path / "ref.nemo", 0)
    other = _tiny_policy(run, tmp_path / "other.nemo", 1, peaked=True)
    common = [f"run.dir={run}", f"model.restore_from_path={ref}", "eval.rm.max_pairs=8",
              "eval.policy.max_prompts=12", "eval.policy.max_length=16", "ppo.model.ppo.length_params.min_length=3"]
    r = cli("stage=eval", f"eval.policy.restore_from_path={ref}", *common)  # the policy is its own reference
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    same = json.loads((run / "eval" / "policy_metrics.json").read_text())
    assert same["prompts"] == 12 and same["win_rate"] == 0.5 and abs(same["kl_mean"]) < 1e-4
    assert same["policy_reward_mean"] == same["reference_reward_mean"]
    rows = [json.loads(line) for line in open(run / "eval" / "policy_samples.jsonl")]
    assert len(rows) == 12 and all(x["policy"] == x["reference"] for x in rows)
    r = cli("stage=eval", f"eval.policy.restore_from_path={other}", *common)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    diff = json.loads((run / "eval" / "policy_metrics.json").read_text())
    assert diff["kl_mean"] > 1.0  # a peaked model against a near-uniform reference
    assert diff["policy_reward_mean"] != diff["reference_reward_mean"]
    assert 0 <= diff["win_rate"] <= 1 and 0 <= diff["policy_cut_at_max_length"] <= 1
    assert diff["policy_length_mean"] <= 16 and "win rate" in r.stdout
    # responses are held to the minimum PPO trained under (eval.policy.min_length null = PPO's)
    assert diff["min_length"] == 3 and diff["policy_length_mean"] >= 3 and diff["reference_length_mean"] >= 3
    assert 0 <= diff["policy_empty"] <= 1
    assert (run / "eval" / "policy_rewards.png").exists()


def test_policy_eval_responses_end_where_ppo_rollouts_end(run, tmp_path):
    """eval.policy stops a response at PPO's end condition (end tokens and end strings), not only at
    EOS: a response that ends reports ended, one that runs on is cut at max_length and counted."""
    import torch

    from data_prep.tokenizers import load_tokenizer
    from evaluation.config import PolicyEvalConfig
    from evaluation.policy_eval import _stats, sampled
    from modeling import load_pretrained
    from modeling.ends import EndCondition

    tok = load_tokenizer(str(run / "prep" / "tokenizer.model"))
    model = load_pretrained(_tiny_policy(run, tmp_path / "p.nemo", 1, peaked=True), dtype=torch.float32).eval()
    prompts = [tok.encode(t) for t in ("Human: hello there", "Human: what is a cat", "Human: tell me more")]
    pe = PolicyEvalConfig(max_length=12, micro_batch_size=3)
    free = sampled(model, prompts, pe, EndCondition(tok, []), tok.eos_id, tok.pad_id, seed=7)
    assert all(len(r) - p == 12 and not ended for r, p, ended in free if tok.eos_id not in r[p:])
    third = tok.decode(free[0][0][free[0][1] + 2: free[0][1] + 3])  # row 0's third response token, as text
    stop = sampled(model, prompts, pe, EndCondition(tok, [third]), tok.eos_id, tok.pad_id, seed=7)
    r, p, ended = stop[0]
    assert ended and len(r) - p <= 3 and r == free[0][0][:len(r)]
    stats = _stats("policy", stop, np.zeros(3))
    assert stats["policy_cut_at_max_length"] == np.mean([not e for *_, e in stop]) < 1
    pe.min_length = 6  # no end before 6 tokens, the end string's included
    held = sampled(model, prompts, pe, EndCondition(tok, [third]), tok.eos_id, tok.pad_id, seed=7)
    assert all(len(r) - p >= 6 for r, p, _ in held)


def test_empty_answers_are_counted_and_their_reward_reported(run):
    """A response of end tokens, end strings and white space says nothing: counted in {name}_empty, and the
    reward model's mean for those rows reported (a policy that learnt to say nothing is exploiting it)."""
    from data_prep.tokenizers import load_tokenizer
    from evaluation.policy_eval import _stats, empty
    from modeling.ends import EndCondition

    tok = load_tokenizer(str(run / "prep" / "tokenizer.model"))
    end = EndCondition(tok, None)
    p = tok.encode("User: hi\n\nAssistant:")
    rows = [(p + [tok.eos_id], len(p), True), (p + tok.encode(" \n\nUser:"), len(p), True),
            (p + tok.encode(" Hello there."), len(p), False), (p, len(p), True)]
    silent = empty(tok, end, rows)
    assert silent.tolist() == [True, True, False, True]
    stats = _stats("policy", rows, np.array([1.0, 2.0, -1.0, 3.0]), silent)
    assert stats["policy_empty"] == 0.75 and stats["policy_empty_reward_mean"] == 2.0


def test_eval_with_nothing_to_evaluate_says_so(run):
    """eval.rm.enabled=false and no policy: refused before anything runs (or is submitted), saying what is
    missing, not an empty success; a policy to evaluate makes the same request valid."""
    before = (run / "manifest.json").read_text()
    r = cli("stage=eval", f"run.dir={run}", "eval.rm.enabled=false", "force=true")
    assert r.returncode != 0 and "invalid configuration" in r.stdout + r.stderr
    assert "nothing to evaluate" in r.stdout + r.stderr and "eval.policy" in r.stdout + r.stderr
    assert (run / "manifest.json").read_text() == before  # no stage started
    r = cli("stage=eval", f"run.dir={run}", "eval.rm.enabled=false", "eval.policy.enabled=false", "dry_run=true")
    assert r.returncode != 0 and "eval.policy.enabled=false" in r.stdout + r.stderr
    r = cli("stage=ppo,eval", f"run.dir={run}", "eval.rm.enabled=false", "dry_run=true")  # ppo will produce one
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_packed_scoring_gives_the_padded_rewards(run, tmp_path):
    """eval.rm.packing (auto = on a GPU): sequences end to end in rows of packed_tokens, block-diagonal
    attention. On the CPU's explicit mask it gives the rewards of padded micro-batches, pair for pair
    (80 sequences in rows of at most 300 tokens: several to a row)."""
    from evaluation.config import RewardEvalConfig
    from evaluation.reward_eval import evaluate_reward_model

    stages = json.loads((run / "manifest.json").read_text())["stages"]
    nemo, prefix = stages["rm"]["artifacts"]["nemo"], stages["prep"]["artifacts"]["data_prefix"]
    out = {}
    for packing in ("false", "true"):
        ev = RewardEvalConfig(restore_from_path=nemo, data_prefix=prefix, max_pairs=40, packing=packing,
                              packed_tokens=300, precision="fp32", bootstrap_samples=10)
        d = tmp_path / packing
        evaluate_reward_model(ev, str(d))
        metrics = json.loads((d / "rm_metrics.json").read_text())
        assert metrics["packed"] == (packing == "true")
        out[packing] = [json.loads(line) for line in open(d / "rm_rewards.jsonl")]
    assert len(out["true"]) == len(out["false"]) == 40
    for a, b in zip(out["false"], out["true"]):
        assert (a["line"], a["subset"]) == (b["line"], b["subset"])
        assert b["reward_chosen"] == pytest.approx(a["reward_chosen"], abs=2e-4)
        assert b["reward_rejected"] == pytest.approx(a["reward_rejected"], abs=2e-4)
