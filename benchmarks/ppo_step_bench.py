"""PPO step time and its split (generation / scoring / training) on one GPU, and generation
tokens/s against transformers' generate() in the same run.

    python3 benchmarks/ppo_step_bench.py --out OUTDIR            # H100: SmolLM2-135M size, then GPT-2B
    python3 benchmarks/ppo_step_bench.py --smoke --out /tmp/x     # toy sizes on the CPU (checks the script)

Random weights (no model hub on the GPU box). Each size: actor (policy, LM head) + frozen reference
(bf16 copy) + reward model + critic (value head) on the GPU, the real PPOTrainer step: rollout batch
64, prompts of 32..256 tokens (uniform, seeded), responses up to 256 tokens (random weights almost
never sample EOS, so nearly all run the full 256: the worst case), one optimizer step per model per
PPO step (global batch 64). Step 1 captures CUDA graphs and warms the allocator; the median of the
next steps is reported.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modeling import RewardModel, ValueModel, build_model, clear_generation_state, generate, presets  # noqa: E402
from modeling.layers import init_weights  # noqa: E402
from ppo.config import PPOConfig  # noqa: E402
from ppo.models import frozen_copy  # noqa: E402
from ppo.trainer import PPOTrainer  # noqa: E402

RESULTS: dict = {}
DEV = "cuda"
T0 = time.perf_counter()


def log(*a):
    print(*a, flush=True)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def gib(x):
    return round(x / 2**30, 2)


class BenchTokenizer:
    """Just what the trainer reads from a tokenizer (random weights make text meaningless)."""

    def __init__(self, vocab):
        self.vocab_size, self.eos_id, self.pad_id, self.bos_id = vocab, 2, 0, None

    def encode(self, s):
        return [5, 6]

    def decode(self, ids):
        return ""


class BenchPrompts:
    def __init__(self, prompts):
        self.prompts = prompts

    def __len__(self):
        return len(self.prompts)

    def batch(self, step, n, rank=0, world=1):
        return self.prompts[:n]


def sizes(smoke):
    if smoke:
        return [("tiny_llama", presets.tiny_llama(), 512, dict(actor_mbs=8, critic_mbs=8, fwd_mbs=16, offload=False))]
    smol = dataclasses.replace(presets.tiny_llama(), name="smollm2_135m_size", num_layers=30, hidden_size=576,
                               ffn_hidden_size=1536, num_attention_heads=9, num_query_groups=3, rotary_base=100000.0,
                               encoder_seq_length=8192, max_position_embeddings=8192, init_method_std=0.02)
    return [("smollm2_135m", smol, 49152, dict(actor_mbs=16, critic_mbs=16, fwd_mbs=16, offload=False)),
            ("gpt2b", presets.gpt_2b_001(), 256000, dict(actor_mbs=4, critic_mbs=8, fwd_mbs=8, offload=True))]


def ppo_config(opts, batch, max_len):
    c = PPOConfig()
    c.model.ppo.num_rollout_samples = batch
    c.model.ppo.rollout_micro_batch_size = batch
    c.model.ppo.forward_micro_batch_size = opts["fwd_mbs"]
    c.model.ppo.length_params.max_length = max_len
    c.model.ppo.sampling_params.end_strings = []
    c.model.ppo.offload_idle_models = opts["offload"]
    c.model.global_batch_size = c.critic.global_batch_size = batch
    c.model.micro_batch_size, c.critic.micro_batch_size = opts["actor_mbs"], opts["critic_mbs"]
    for o in (c.model.optim, c.critic.optim):
        o.sched.warmup_steps, o.sched.constant_steps, o.sched.min_lr = 0, 0, 0.0
    return c


def build(cfg, vocab, dtype):
    torch.manual_seed(0)
    actor = build_model(cfg, vocab, device=DEV, dtype=dtype)
    ref = frozen_copy(actor)
    models = []
    for cls in (RewardModel, ValueModel):
        with torch.device(DEV):
            m = cls(cfg, vocab)
        init_weights(m, cfg)
        models.append(m.to(dtype))
    reward, critic = models
    reward.eval().requires_grad_(False)
    return actor, ref, reward, critic


def state_bytes(trainer):
    out = {}
    for name, tm in (("actor", trainer.actor), ("critic", trainer.critic)):
        params = sum(p.numel() * p.element_size() for p in tm.model.parameters())
        master = 0 if not tm.weights.mixed else sum(m.numel() * m.element_size() for m in tm.weights.master)
        opt = sum(v.numel() * v.element_size() for s in tm.opt.state.values() for v in s.values()
                  if torch.is_tensor(v) and v.dim() > 0)
        out[name] = {"params_gib": gib(params), "fp32_master_gib": gib(master), "adam_state_gib": gib(opt)}
    for name, m in (("reference", trainer.reference), ("reward", trainer.reward)):
        out[name] = {"params_gib": gib(sum(p.numel() * p.element_size() for p in m.parameters()))}
    return out


def ppo_steps(name, cfg, vocab, opts, batch, prompts, max_len, steps):
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    res = {"config": name, "vocab": vocab, "batch": batch, "max_response": max_len, **opts,
           "torch_compile": cfg.torch_compile, "activation_memory_budget": cfg.activation_memory_budget,
           "prompt_len_mean": statistics.mean(len(p) for p in prompts)}
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    actor, ref, reward, critic = build(cfg, vocab, dtype)
    res["params"] = {"actor": sum(p.numel() for p in actor.parameters()),
                     "critic": sum(p.numel() for p in critic.parameters())}
    pcfg = ppo_config(opts, batch, max_len)
    trainer = PPOTrainer(pcfg, actor=actor, reference=ref, reward=reward, critic=critic, tokenizer=BenchTokenizer(vocab),
                         train_data=BenchPrompts(prompts), val_data=BenchPrompts(prompts), device=torch.device(DEV),
                         max_steps=100, stage_dir="/tmp", offload_idle_models=opts["offload"])
    rows = []
    for i in range(steps + 1):
        m = trainer.train_step()
        keep = {k: m[k] for k in ("time_step", "time_generation", "time_scoring", "time_training",
                                  "generation_tokens_per_s", "response_length", "kl", "clip_fraction",
                                  "value_loss", "entropy") if k in m}
        rows.append(keep)
        log(name, "step", i + 1, json.dumps({k: round(v, 4) for k, v in keep.items()}))
    timed = rows[1:] or rows
    med = {k: statistics.median(r[k] for r in timed) for k in timed[0]}
    res.update(first_step=rows[0], steps=timed, median=med,
               generation_share_of_step=med["time_generation"] / med["time_step"], states=state_bytes(trainer))
    if DEV == "cuda":
        res["peak_gpu_memory_gib"] = gib(torch.cuda.max_memory_allocated())
        res["peak_gpu_reserved_gib"] = gib(torch.cuda.max_memory_reserved())
    # generation alone, same prompts, exactly max_len new tokens per row (for the transformers comparison)
    clear_generation_state(actor)
    gen = lambda: generate(actor, prompts, max_length=max_len, min_length=max_len, temperature=1.0, seed=0)  # noqa: E731
    gen()
    sync()
    t0 = time.perf_counter()
    gen()
    sync()
    res["ours_generate_s"] = time.perf_counter() - t0
    res["ours_generate_tokens_per_s"] = batch * max_len / res["ours_generate_s"]
    clear_generation_state(actor)
    del trainer, actor, ref, reward, critic
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return res


def hf_generate(cfg, vocab, prompts, max_len):
    """transformers LlamaForCausalLM of the same sizes (it cannot express GPT-2B's layernorm1p or half
    rotary, which cost next to nothing), bf16, sdpa, dynamic cache, left-padded prompts, sampling."""
    import transformers

    hcfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.query_groups, max_position_embeddings=4096,
        tie_word_embeddings=cfg.share_embeddings_and_output_weights, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(DEV):
        hf = transformers.LlamaForCausalLM(hcfg).to(torch.bfloat16 if DEV == "cuda" else torch.float32).eval()
    p = max(len(x) for x in prompts)
    ids = torch.zeros(len(prompts), p, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(prompts):
        ids[i, p - len(x):] = torch.tensor(x)
        mask[i, p - len(x):] = 1
    ids, mask = ids.to(DEV), mask.to(DEV)
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
    with torch.no_grad():
        try:
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, **kw)
        except Exception as e:  # noqa: BLE001 - a transformers version that rejects top_k=0: greedy instead
            log("transformers sampling failed, timing greedy:", repr(e)[:200])
            kw = dict(do_sample=False, pad_token_id=0)
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, **kw)
        sync()
        t0 = time.perf_counter()
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_len, min_new_tokens=max_len, **kw)
        sync()
        t = time.perf_counter() - t0
    n = (out.shape[1] - p) * len(prompts)
    del hf
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return {"s": t, "tokens_per_s": n / t, "new_tokens": out.shape[1] - p, "sampling": kw.get("do_sample"),
            "transformers": transformers.__version__}


def main():
    global DEV
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--only", default="", help="comma list of size names to run")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step")
    ap.add_argument("--budget-s", type=float, default=330.0, help="skip transformers once this much time is spent")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=SIZE:key=val,... an extra run of SIZE with changed options (compile=1, budget=0.7, offload=0, "
                         "actor_mbs, critic_mbs, fwd_mbs, ckpt=1); repeatable")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers generate() comparison")
    ap.add_argument("--mem-cap-gib", type=float, default=0.0,
                    help="cap this process's GPU memory (e.g. 79 = what an 80 GB H100 offers) on a larger GPU")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.mem_cap_gib and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.mem_cap_gib * 2**30 / total))
        RESULTS["memory_cap_gib"] = args.mem_cap_gib
    if args.smoke or not torch.cuda.is_available():
        DEV = "cpu"
    batch, max_len, plen = (8, 16, (4, 24)) if args.smoke else (64, 256, (32, 256))
    RESULTS.update(command=" ".join(["python3"] + sys.argv), device=torch.cuda.get_device_name() if DEV == "cuda" else
                   platform.processor() or "cpu", torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M"))
    path = os.path.join(args.out, "ppo_step_results.json")
    runs = [r for r in sizes(args.smoke) if not args.only or r[0] in args.only.split(",")]
    base = {r[0]: r for r in sizes(args.smoke)}
    for spec in args.variant:  # NAME=SIZE:key=val,...
        vname, rest = spec.split("=", 1)
        size, _, kv = rest.partition(":")
        _, cfg, vocab, opts = base[size]
        opts = dict(opts)
        for item in filter(None, kv.split(",")):
            k, v = item.split("=")
            if k == "compile":
                cfg = dataclasses.replace(cfg, torch_compile=bool(int(v)))
            elif k == "ckpt":
                cfg = dataclasses.replace(cfg, activations_checkpointing=bool(int(v)))
            elif k == "budget":
                cfg = dataclasses.replace(cfg, activation_memory_budget=float(v))
            elif k == "offload":
                opts[k] = bool(int(v))
            else:
                opts[k] = int(v)
        opts["variant_of"] = size
        runs.append((vname, cfg, vocab, opts))
    for name, cfg, vocab, opts in runs:
        g = torch.Generator().manual_seed(1)
        lens = torch.randint(plen[0], plen[1] + 1, (batch,), generator=g).tolist()
        prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]
        attempts = [(cfg, opts)]
        if name == "gpt2b":  # if the plan does not fit: smaller micro-batches + activation recompute
            ckpt = dataclasses.replace(cfg, activations_checkpointing=True)
            attempts.append((ckpt, dict(opts, actor_mbs=2, critic_mbs=4, fwd_mbs=4)))
            attempts.append((ckpt, dict(opts, actor_mbs=2, critic_mbs=4, fwd_mbs=4, offload=False)))
        for i, (c, o) in enumerate(attempts):
            try:
                RESULTS[name] = ppo_steps(name, c, vocab, o, batch, prompts, max_len, 1 if args.smoke else args.steps)
                RESULTS[name]["activations_checkpointing"] = c.activations_checkpointing
                break
            except Exception as e:  # noqa: BLE001 - record it and go on (OOM first of all)
                RESULTS.setdefault("errors", []).append({"size": name, "attempt": i, "opts": o, "error": repr(e)[:600]})
                RESULTS[name] = {"error": repr(e)[:600]}
                log(name, "attempt", i, "failed:", repr(e)[:600])
                gc.collect()
                if DEV == "cuda":
                    torch.cuda.empty_cache()
        if args.no_hf or "variant_of" in opts:
            with open(path, "w") as f:
                json.dump(RESULTS, f, indent=1)
            continue
        if time.perf_counter() - T0 > args.budget_s:
            log("time budget spent: skipping transformers for", name)
            continue
        with open(path, "w") as f:
            json.dump(RESULTS, f, indent=1)
        try:
            hf = hf_generate(cfg, vocab, prompts, max_len)
            RESULTS[name]["transformers_generate"] = hf
            if "ours_generate_tokens_per_s" in RESULTS[name]:
                RESULTS[name]["generate_speedup_vs_transformers"] = RESULTS[name]["ours_generate_tokens_per_s"] / hf["tokens_per_s"]
            log(name, "transformers", json.dumps(hf))
        except Exception as e:  # noqa: BLE001 - the PPO numbers stand without the comparison
            RESULTS[name]["transformers_generate"] = {"error": repr(e)[:400]}
            log(name, "transformers failed", repr(e)[:400])
        with open(path, "w") as f:
            json.dump(RESULTS, f, indent=1)
    log("| size | step s | generation s | scoring s | training s | gen share | ours gen tok/s | transformers tok/s | x | peak GiB |")
    for name, r in RESULTS.items():
        if not isinstance(r, dict) or "median" not in r:
            continue
        m, hf = r["median"], r.get("transformers_generate", {})
        log(f"| {name} | {m['time_step']:.3f} | {m['time_generation']:.3f} | {m['time_scoring']:.3f} | "
            f"{m['time_training']:.3f} | {r['generation_share_of_step']:.2f} | {r['ours_generate_tokens_per_s']:.0f} | "
            f"{hf.get('tokens_per_s', float('nan')):.0f} | {r.get('generate_speedup_vs_transformers', float('nan')):.1f} | "
            f"{r.get('peak_gpu_memory_gib', '-')} |")


if __name__ == "__main__":
    main()
