"""Policy evaluation: responses of the policy and of its reference on held-out prompts, both scored by
the reward model. Reports reward mean/std of each, the policy's win rate over the reference, KL to the
reference (sum over the policy's response tokens of log p_policy - log p_ref, teacher-forced), response
lengths and the share cut at max_length; writes a side-by-side JSONL and a reward histogram."""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, List

import numpy as np
import torch

from engine.io import atomic_write, write_json
from data_prep.sources import read_jsonl

from .config import PolicyEvalConfig

log = logging.getLogger(__name__)


def read_prompts(path: str, limit: int) -> List[str]:
    """prep's {split}_prompts.jsonl ({"text"}) or any JSONL with a "prompt" or "text" string."""
    out = []
    for _, _, rec in read_jsonl(path, os.path.basename(path)):
        text = rec.get("prompt", rec.get("text")) if isinstance(rec, dict) else None
        if isinstance(text, str) and text:
            out.append(text)
        if len(out) >= limit:
            break
    return out


@torch.no_grad()
def sampled(model, prompts: List[List[int]], pe: PolicyEvalConfig, end, eos_id: int, pad_id: int, seed: int):
    """(tokens, prompt length, ended) per prompt; a response ends where PPO's rollouts end (`end`, a
    modeling.ends.EndCondition), never before pe.min_length tokens, or after pe.max_length tokens."""
    from modeling import clear_generation_state, generate

    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    rows = []
    for s in range(0, len(prompts), pe.micro_batch_size):
        out = generate(model, prompts[s: s + pe.micro_batch_size], max_length=pe.max_length,
                       min_length=pe.min_length or 0, temperature=pe.temperature,
                       top_k=pe.top_k, top_p=pe.top_p, greedy=pe.greedy, end_token_ids=end.token_ids, eos_id=eos_id,
                       end_strings=end.strings, detokenize=end.detokenize, pad_id=pad_id, generator=g)
        for row, n, p, e in zip(out.tokens.tolist(), out.lengths.tolist(), out.prompt_lengths.tolist(),
                                out.ended.tolist()):
            rows.append((row[:n], p, bool(e)))
    clear_generation_state(model)
    return rows


@torch.no_grad()
def response_logprob(model, rows, pad_id: int, micro_batch_size: int) -> np.ndarray:
    """Sum of log p(response token | prefix) per row (right-padded: no mask needed)."""
    dev = next(model.parameters()).device
    out = []
    for s in range(0, len(rows), micro_batch_size):
        part = rows[s: s + micro_batch_size]
        width = max(len(r) for r, *_ in part)
        ids = torch.full((len(part), width), pad_id, dtype=torch.long)
        for i, (r, *_) in enumerate(part):
            ids[i, : len(r)] = torch.tensor(r)
        lp = model(ids.to(dev)).float().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None].to(dev)).squeeze(-1).cpu()
        for i, (r, p, *_) in enumerate(part):
            out.append(float(lp[i, p - 1: len(r) - 1].sum()))
    return np.array(out)


@torch.no_grad()
def rewards(rm, rows, pad_id: int, micro_batch_size: int) -> np.ndarray:
    dev = next(rm.parameters()).device
    out = []
    for s in range(0, len(rows), micro_batch_size):
        part = [r for r, *_ in rows[s: s + micro_batch_size]]
        ids = torch.full((len(part), max(map(len, part))), pad_id, dtype=torch.long)
        for i, r in enumerate(part):
            ids[i, : len(r)] = torch.tensor(r)
        out += rm(ids.to(dev), lengths=torch.tensor([len(r) for r in part]).to(dev)).float().cpu().tolist()
    return np.array(out)


def empty(tok, end, rows) -> np.ndarray:
    """Per row: the response says nothing (only end tokens, end strings and white space)."""
    out = []
    for x, p, _ in rows:
        text = tok.decode([t for t in x[p:] if t not in end.token_ids and t != tok.eos_id])
        for s in end.end_strings:
            text = text.replace(s, "")
        out.append(not text.strip())
    return np.array(out, dtype=bool)


def _stats(name, rows, r, silent=None) -> Dict[str, float]:
    n = np.array([len(x) - p for x, p, _ in rows])
    cut = np.array([not ended for *_, ended in rows])
    out = {f"{name}_reward_mean": float(r.mean()), f"{name}_reward_std": float(r.std()),
           f"{name}_length_mean": float(n.mean()), f"{name}_cut_at_max_length": float(cut.mean())}
    if silent is not None:
        out[f"{name}_empty"] = float(silent.mean())
        out[f"{name}_empty_reward_mean"] = float(r[silent].mean()) if silent.any() else None
    return out


def evaluate_policy(pe: PolicyEvalConfig, reference: str, reward_model: str, stage_dir: str) -> Dict[str, str]:
    from data_prep.tokenizers import load_tokenizer
    from modeling import load_pretrained
    from modeling.ends import EndCondition

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prompts_path = pe.prompts.get(pe.split) if isinstance(pe.prompts, dict) else pe.prompts
    prompts_path = prompts_path[0] if isinstance(prompts_path, (list, tuple)) else prompts_path
    if not prompts_path:
        raise ValueError("eval.policy.prompts: set a prompts JSONL, or run stage prep first")
    tok = load_tokenizer(pe.restore_from_path, "nemo", extract_dir=os.path.join(stage_dir, "tokenizer"))
    texts = read_prompts(str(prompts_path), pe.max_prompts)
    ids = [tok.encode(t) for t in texts]
    policy = load_pretrained(pe.restore_from_path, dtype=torch.float32, device=device).eval()
    ref = load_pretrained(reference, dtype=torch.float32, device=device).eval()
    end = EndCondition(tok, pe.end_strings)
    log.info("responses end at %s (eval.policy.end_strings%s), not before %d tokens (eval.policy.min_length), "
             "or after %d tokens", end.end_strings, ": null = the tokenizer's and the prompt format's"
             if pe.end_strings is None else "", pe.min_length or 0, pe.max_length)
    pol_rows = sampled(policy, ids, pe, end, tok.eos_id, tok.pad_id, pe.seed)
    ref_rows = sampled(ref, ids, pe, end, tok.eos_id, tok.pad_id, pe.seed)
    kl = response_logprob(policy, pol_rows, tok.pad_id, pe.micro_batch_size) - \
        response_logprob(ref, pol_rows, tok.pad_id, pe.micro_batch_size)
    del policy, ref
    rm = load_pretrained(reward_model, head="reward", dtype=torch.float32, device=device).eval()
    rp, rr = rewards(rm, pol_rows, tok.pad_id, pe.micro_batch_size), rewards(rm, ref_rows, tok.pad_id, pe.micro_batch_size)
    metrics = {"policy": pe.restore_from_path, "reference": reference, "reward_model": reward_model,
               "prompts": len(ids), "win_rate": float(np.where(rp > rr, 1.0, np.where(rp == rr, 0.5, 0.0)).mean()),
               "kl_mean": float(kl.mean()), "kl_std": float(kl.std()),
               "end_strings": end.end_strings, "min_length": pe.min_length or 0, "max_length": pe.max_length,
               **_stats("policy", pol_rows, rp, empty(tok, end, pol_rows)),
               **_stats("reference", ref_rows, rr, empty(tok, end, ref_rows))}
    mpath = os.path.join(stage_dir, "policy_metrics.json")
    write_json(mpath, metrics)
    spath = os.path.join(stage_dir, "policy_samples.jsonl")
    with atomic_write(spath) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for t, (a, pa, _), (b, pb, _), x, y, k in zip(texts, pol_rows, ref_rows, rp, rr, kl):
            f.write(json.dumps({"prompt": t, "policy": tok.decode(a[pa:]), "reference": tok.decode(b[pb:]),
                                "reward_policy": round(float(x), 6), "reward_reference": round(float(y), 6),
                                "kl": round(float(k), 6)}) + "\n")
    ppath = _plot(rp, rr, os.path.join(stage_dir, "policy_rewards.png"))
    log.info("policy vs reference on %d prompts: reward %.3f +- %.3f vs %.3f +- %.3f, win rate %.3f, KL %.2f nats, "
             "length %.1f vs %.1f tokens, cut at max_length %.2f vs %.2f", len(ids), metrics["policy_reward_mean"],
             metrics["policy_reward_std"], metrics["reference_reward_mean"], metrics["reference_reward_std"],
             metrics["win_rate"], metrics["kl_mean"], metrics["policy_length_mean"], metrics["reference_length_mean"],
             metrics["policy_cut_at_max_length"], metrics["reference_cut_at_max_length"])
    if metrics["policy_empty"] > max(0.1, 2 * metrics["reference_empty"]):
        log.warning("the policy answers %.0f%% of the prompts with nothing (the reference %.0f%%), and the reward model "
                    "scores those empty answers %.3f on average (the reference's answers: %.3f): the policy has learnt "
                    "to exploit the reward model, not to answer (see %s). A reward model that pays for brevity (its "
                    "eval's longer_wins_accuracy well under 0.5) invites it; a PPO min_length only hides it",
                    100 * metrics["policy_empty"], 100 * metrics["reference_empty"], metrics["policy_empty_reward_mean"],
                    metrics["reference_reward_mean"], spath)
    return {"policy_metrics": mpath, "policy_samples": spath, "policy_plot": ppath}


def _plot(rp, rr, path):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    bins = np.histogram_bin_edges(np.concatenate([rp, rr]), bins=30)
    ax.hist(rr, bins, alpha=0.6, label="reference")
    ax.hist(rp, bins, alpha=0.6, label="policy")
    ax.set_xlabel("reward")
    ax.legend()
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
