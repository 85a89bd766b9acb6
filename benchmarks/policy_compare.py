"""Compare a run's trained policy with its initial policy on held-out prompts, scored by the run's
reward model: reward mean/std of each, the gain in initial-policy standard deviations, win rate of the
trained policy (ties count half), KL of the trained policy to the initial one on its own responses
(nats per response), response length, the share cut at max_length, and a side-by-side JSONL.

    python benchmarks/policy_compare.py <run dir> [--out DIR] [--prompts N] [--seed S]

Everything is read from the run: its manifest (prep's held-out prompts and tokenizer, rm's .nemo, ppo's
.nemo) and ppo/config.yaml (the initial policy, sampling and length parameters, end strings).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_prep.tokenizers import load_tokenizer  # noqa: E402
from ppo.config import PPOConfig  # noqa: E402
from ppo.data import PromptDataset  # noqa: E402
from ppo.models import compute_dtype, load_actor, load_reward, mask_padded_vocab, model_config  # noqa: E402
from ppo.rollout import EndCondition, generate_responses, token_logprobs  # noqa: E402


def _responses(model, prompts, rcfg, end, tok, gen_seed, device):
    g = torch.Generator(device=device).manual_seed(gen_seed)
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    return generate_responses(model, prompts, micro_batch_size=64, sampling=rcfg.sampling_params,
                              length=rcfg.length_params, end=end, eos_id=tok.eos_id, pad_id=pad, generator=g)


@torch.no_grad()
def _score(batch, reward, policy, reference, mb=32):
    scores, kl = [], []
    for i in range(0, len(batch), mb):
        sub = batch.select(list(range(i, min(len(batch), i + mb))))
        scores.append(reward(sub.tokens, lengths=sub.lengths).float().cpu())
        lp = token_logprobs(policy, sub.tokens, sub.mask)[0]
        ref = token_logprobs(reference, sub.tokens, sub.mask)[0]
        kl.append(((lp - ref) * sub.mask).sum(-1).cpu())
    return torch.cat(scores), torch.cat(kl)


def _summary(scores, kl, batch, max_length):
    resp = (batch.lengths - batch.prompt_lengths).float().cpu()
    return {"reward_mean": float(scores.mean()), "reward_std": float(scores.std(unbiased=False)),
            "kl_to_initial": float(kl.mean()), "response_length": float(resp.mean()),
            "cut_at_max_length": float((~batch.ended).float().mean()),
            "at_max_length": float((resp >= max_length).float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--out", default=None, help="where to write compare.json and side_by_side.jsonl (default: <run>/compare)")
    ap.add_argument("--prompts", type=int, default=0, help="held-out prompts to use (0 = all)")
    ap.add_argument("--seed", type=int, default=4321)
    args = ap.parse_args()
    run = Path(args.run_dir).resolve()
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    cfg = OmegaConf.load(run / "ppo" / "config.yaml")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    tok = load_tokenizer(stages["prep"]["artifacts"]["tokenizer"], None)
    rcfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PPOConfig), cfg.ppo)).model.ppo
    mcfg = model_config(cfg.model)
    dtype = compute_dtype(mcfg.precision, device)
    test_prompts = stages["prep"]["artifacts"]["prompts"]["test"]
    max_prompt = cfg.ppo.model.data.seq_length - rcfg.length_params.max_length
    data = PromptDataset([test_prompts], tok, max_prompt, shuffle=False)
    prompts = data.prompts[: args.prompts or len(data.prompts)]
    initial = load_actor(mcfg, tok.vocab_size, device, dtype, cfg.ppo.model.seed)
    trained = load_actor(dataclasses.replace(mcfg, restore_from_path=stages["ppo"]["artifacts"]["nemo"]),
                         tok.vocab_size, device, dtype, cfg.ppo.model.seed)
    for m in (initial, trained):
        mask_padded_vocab(m, tok.vocab_size)
        m.eval()
    reward = load_reward(stages["rm"]["artifacts"]["nemo"], device, dtype)
    end = EndCondition(tok, rcfg.sampling_params.end_strings)
    out = {}
    rows = {}
    for name, model in (("initial", initial), ("trained", trained)):
        t = time.time()
        batch = _responses(model, prompts, rcfg, end, tok, args.seed, device)
        scores, kl = _score(batch, reward, model, initial)
        out[name] = dict(_summary(scores, kl, batch, rcfg.length_params.max_length), seconds=round(time.time() - t, 1))
        rows[name] = (batch, scores)
    (bi, si), (bt, st) = rows["initial"], rows["trained"]
    wins = (st > si).float() + 0.5 * (st == si).float()
    n = len(prompts)
    out["prompts"] = n
    out["win_rate"] = float(wins.mean())
    out["win_rate_ci95"] = 1.96 * math.sqrt(out["win_rate"] * (1 - out["win_rate"]) / n)
    out["gain_in_initial_std"] = (out["trained"]["reward_mean"] - out["initial"]["reward_mean"]) / max(
        out["initial"]["reward_std"], 1e-9)
    out["end_strings"] = end.end_strings
    out["seconds"] = round(time.time() - t0, 1)
    dest = Path(args.out or run / "compare")
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / "side_by_side.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            def text(b, j):
                p, ln = int(b.prompt_lengths[j]), int(b.lengths[j])
                return tok.decode(b.tokens[j, p:ln].tolist())
            f.write(json.dumps({"prompt": tok.decode(prompts[i]), "initial": text(bi, i), "trained": text(bt, i),
                                "reward_initial": round(float(si[i]), 4), "reward_trained": round(float(st[i]), 4)},
                               ensure_ascii=False) + "\n")
    (dest / "compare.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
