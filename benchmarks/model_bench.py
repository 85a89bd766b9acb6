"""GPU benchmarks for modeling/: correctness (bf16 vs fp32, ours vs transformers), training-step MFU
and generation tokens/s, each side by side with transformers in the same process.

    python benchmarks/model_bench.py --out OUTDIR [--sections correctness,train,generate]

Writes OUTDIR/model_bench.json (every number) and OUTDIR/model_bench.md (tables, the exact command
and the device). Random weights throughout (no model hub on the GPU machine).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from modeling import RewardModel, build_model, clear_generation_state, flops_per_token, generate, presets  # noqa: E402
from modeling.hf_import import config_from_hf  # noqa: E402
from modeling.model import GPTModel  # noqa: E402
from modeling.state_dict import from_hf_llama  # noqa: E402

H100_BF16_PEAK = 989.4e12  # dense bf16 tensor-core peak of an H100 SXM (the MFU denominator)
RESULTS: dict = {"sections": {}}
# --smoke swaps these for toy sizes on the CPU, to check the script without a GPU
DEV = "cuda"
GPT = {"cfg": presets.gpt_2b_001, "vocab": 256000}


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def log(*a):
    print(*a, flush=True)


def timed(fn, iters, warmup):
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def smollm2_size():
    if DEV == "cpu":
        return dataclasses.replace(presets.tiny_llama(), num_query_groups=2, init_method_std=0.02)
    return dataclasses.replace(presets.tiny_llama(), name="smollm2_135m_size", num_layers=30, hidden_size=576,
                               ffn_hidden_size=1536, num_attention_heads=9, num_query_groups=3, rotary_base=100000.0,
                               encoder_seq_length=8192, max_position_embeddings=8192, init_method_std=0.02)


def hf_llama_config(cfg, vocab):
    import transformers
    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.query_groups, max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rotary_base, rms_norm_eps=1e-5, tie_word_embeddings=cfg.share_embeddings_and_output_weights,
        attn_implementation="sdpa", initializer_range=cfg.init_method_std)


def ours_from_hf(hf) -> GPTModel:
    cfg = config_from_hf(hf.config.to_dict())
    sd = hf.state_dict()
    ours_sd = from_hf_llama(lambda n: sd[n], list(sd), cfg)
    with torch.device("meta"):
        m = GPTModel(cfg, ours_sd["language_model.embedding.word_embeddings.weight"].shape[0])
    m.load_state_dict(ours_sd, assign=True)
    return m


def matmul_peak():
    if DEV == "cpu":
        return 0.0
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    t, _ = timed(lambda: a @ b, 10, 3)
    return 2 * 8192 ** 3 / t


# --- correctness -------------------------------------------------------------------------------

def correctness():
    out = {}
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    m = build_model(GPT["cfg"](), vocab_size=GPT["vocab"], device=DEV).eval()
    x = torch.randint(0, GPT["vocab"], (2, 512), device=DEV)
    with torch.no_grad():
        ref = m(x).float()
        mb = m.to(torch.bfloat16)
        lo = mb(x).float()
    out["gpt2b_bf16_vs_fp32_rel_err"] = rel(lo, ref)
    out["gpt2b_bf16_vs_fp32_argmax_agree"] = float((lo.argmax(-1) == ref.argmax(-1)).float().mean())
    # bf16 generation: CUDA graphs vs eager, and a short greedy continuation vs recomputation
    p = torch.randint(0, GPT["vocab"], (4, 32), device=DEV)
    g1 = generate(mb, p, max_length=16, greedy=True)
    g2 = generate(mb, p, max_length=16, greedy=True, use_cuda_graph=False)
    out["gpt2b_bf16_generate_graph_equals_eager"] = bool(torch.equal(g1.tokens, g2.tokens))
    clear_generation_state(mb)
    del m, mb
    torch.cuda.empty_cache()

    import transformers
    torch.manual_seed(1)
    cfg = smollm2_size()
    with torch.device(DEV):
        hf = transformers.LlamaForCausalLM(hf_llama_config(cfg, 49152)).eval()
    ours = ours_from_hf(hf).eval()
    x = torch.randint(0, 49152, (2, 256), device=DEV)
    with torch.no_grad():
        out["smollm2size_fp32_ours_vs_transformers_rel_err"] = rel(ours(x), hf(x).logits)
        # fp32 KV-cache greedy vs recomputation, different prompt lengths
        prompts = [x[0, :50].tolist(), x[1, :13].tolist()]
        g = generate(ours, prompts, max_length=12, greedy=True)
        ok = True
        for i, pr in enumerate(prompts):
            seq = list(pr)
            for _ in range(12):
                seq.append(int(ours(torch.tensor([seq], device=DEV))[0, -1].argmax()))
            ok &= g.tokens[i, : len(seq)].tolist() == seq
        out["smollm2size_fp32_kv_cache_equals_recompute"] = bool(ok)
    torch.backends.cuda.matmul.allow_tf32 = True
    return out


def bf16_same_weights():
    """Is our bf16 error the format's or ours? Same 2B-size Llama weights, both engines, bf16 vs fp32."""
    import transformers
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    cfg = dataclasses.replace(GPT["cfg"](), normalization="rmsnorm", rotary_percentage=1.0)
    with torch.device(DEV):
        hf = transformers.LlamaForCausalLM(hf_llama_config(cfg, GPT["vocab"])).eval()
    ours = ours_from_hf(hf).eval()
    x = torch.randint(0, GPT["vocab"], (2, 512), device=DEV)
    out = {}
    with torch.no_grad():
        hf32, ours32 = hf(x).logits.float(), ours(x).float()
        out["fp32_ours_vs_transformers"] = rel(ours32, hf32)
        hf.to(torch.bfloat16)
        ours = ours_from_hf(hf).eval()
        hf16, ours16 = hf(x).logits.float(), ours(x).float()
    out["bf16_vs_fp32_ours"] = rel(ours16, ours32)
    out["bf16_vs_fp32_transformers"] = rel(hf16, hf32)
    out["bf16_ours_vs_bf16_transformers"] = rel(ours16, hf16)
    out["argmax_agree_bf16_vs_fp32_ours"] = float((ours16.argmax(-1) == ours32.argmax(-1)).float().mean())
    out["argmax_agree_bf16_vs_fp32_transformers"] = float((hf16.argmax(-1) == hf32.argmax(-1)).float().mean())
    torch.backends.cuda.matmul.allow_tf32 = True
    return out


# --- training MFU ------------------------------------------------------------------------------

def train_step_fn(model, x, head):
    def step():
        r = head(x)
        loss = -F.logsigmoid(r[0::2] - r[1::2]).mean()  # pairwise RM loss, chosen/rejected interleaved
        loss.backward()
        for p in model.parameters():
            p.grad = None
    return step


def train_bench(batches=(4, 8), seq=2048, iters=8):
    out = {"seq_len": seq, "peak_flops": H100_BF16_PEAK}
    cfg = GPT["cfg"]()
    fpt = flops_per_token(cfg, seq, vocab_size=GPT["vocab"], lm_head=False, training=True)
    out["flops_per_token"] = fpt
    variants = [("ours_eager", False, False, batches), ("ours_compile", True, False, batches),
                ("ours_compile_ckpt", True, True, batches[-1:])]
    for name, comp, ckpt, bss in variants:
        for bs in bss:
            key = f"{name}_b{bs}"
            try:
                torch.manual_seed(0)
                c = dataclasses.replace(cfg, torch_compile=comp, activations_checkpointing=ckpt)
                with torch.device(DEV):
                    rm = RewardModel(c, GPT["vocab"])
                rm.to(torch.bfloat16).train()
                x = torch.randint(0, GPT["vocab"], (bs, seq), device=DEV)
                t0 = time.perf_counter()
                step = train_step_fn(rm, x, rm)
                step()
                sync()
                first = time.perf_counter() - t0
                t, ts = timed(step, iters, 2)
                tok_s = bs * seq / t
                out[key] = {"step_s": t, "tokens_per_s": tok_s, "mfu": tok_s * fpt / H100_BF16_PEAK,
                            "first_step_s": first, "max_mem_gb": torch.cuda.max_memory_allocated() / 1e9}
                log(key, json.dumps(out[key]))
            except torch.OutOfMemoryError:
                out[key] = "OOM"
                log(key, "OOM")
            finally:
                rm = step = None
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    import transformers
    for bs in batches:
        key = f"transformers_llama_b{bs}"
        try:
            torch.manual_seed(0)
            with torch.device(DEV):
                hf = transformers.LlamaForCausalLM(hf_llama_config(cfg, GPT["vocab"])).model
                head = torch.nn.Linear(cfg.hidden_size, 1)
            hf.to(torch.bfloat16).train()
            head.to(torch.bfloat16)
            hf.gradient_checkpointing = False
            x = torch.randint(0, GPT["vocab"], (bs, seq), device=DEV)

            def hf_head(ids):
                return head(hf(input_ids=ids).last_hidden_state[:, -1]).float().squeeze(-1)
            step = train_step_fn(hf, x, hf_head)
            t, _ = timed(step, iters, 2)
            tok_s = bs * seq / t
            out[key] = {"step_s": t, "tokens_per_s": tok_s, "mfu": tok_s * fpt / H100_BF16_PEAK,
                        "max_mem_gb": torch.cuda.max_memory_allocated() / 1e9}
            log(key, json.dumps(out[key]))
        except torch.OutOfMemoryError:
            out[key] = "OOM"
            log(key, "OOM")
        finally:
            hf = head = step = None
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return out


# --- generation --------------------------------------------------------------------------------

def gen_bench(batch=64, prompt=256, new=256):
    import transformers
    out = {"batch": batch, "prompt_len": prompt, "new_tokens": new, "decoding": "greedy, min_length=max_length"}
    sizes = [("gpt2b", GPT["cfg"](), GPT["vocab"]), ("smollm2_135m", smollm2_size(), 49152)]
    for name, cfg, vocab in sizes:
        torch.manual_seed(0)
        x = torch.randint(0, vocab, (batch, prompt), device=DEV)
        with torch.device(DEV):
            hf = transformers.LlamaForCausalLM(hf_llama_config(cfg, vocab)).to(torch.bfloat16).eval()
        same = ours_from_hf(hf).eval()  # our engine on the very same (Llama-arch) weights
        runs = [("ours_same_weights", same)]
        if name == "gpt2b":
            runs.append(("ours_gpt2b001_arch", build_model(cfg, vocab, device=DEV, dtype=torch.bfloat16).eval()))
        for rname, m in runs:
            key = f"{name}_{rname}"
            generate(m, x, max_length=new, min_length=new, greedy=True)  # captures the CUDA graphs
            t, ts = timed(lambda: generate(m, x, max_length=new, min_length=new, greedy=True), 3, 0)
            out[key] = {"s": t, "tokens_per_s": batch * new / t, "all_s": ts}
            sample = lambda: generate(m, x, max_length=new, min_length=new, temperature=1.0, top_k=50, top_p=0.9, seed=0)  # noqa: E731
            t2, _ = timed(sample, 1, 1)
            out[key]["sampling_topk50_topp0.9_tokens_per_s"] = batch * new / t2
            log(key, json.dumps(out[key]))
            if rname == "ours_same_weights":
                ours_tokens = generate(m, x, max_length=new, min_length=new, greedy=True).tokens[:, prompt:]
            clear_generation_state(m)
        mask = torch.ones_like(x)
        with torch.no_grad():
            hf.generate(input_ids=x, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
            sync()
            t0 = time.perf_counter()
            hf_out = hf.generate(input_ids=x, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=0)
            sync()
            t = time.perf_counter() - t0
        hf_tokens = hf_out[:, prompt:]
        agree = (hf_tokens[:, :16] == ours_tokens[:, :16]).float().mean().item()
        out[f"{name}_transformers_generate"] = {"s": t, "tokens_per_s": batch * new / t,
                                                "first16_tokens_agree_with_ours_same_weights": agree}
        out[f"{name}_speedup_vs_transformers"] = out[f"{name}_ours_same_weights"]["tokens_per_s"] / (batch * new / t)
        log(name, "transformers", json.dumps(out[f"{name}_transformers_generate"]))
        del hf, same, runs
        torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--sections", default="correctness,generate,train")
    ap.add_argument("--batches", default="4,8")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (checks the script only)")
    args = ap.parse_args()
    global DEV
    if args.smoke:
        DEV = "cpu"
        GPT.update(cfg=presets.tiny_gpt, vocab=1000)
        torch.cuda.max_memory_allocated = lambda: 0
        torch.cuda.empty_cache = torch.cuda.reset_peak_memory_stats = lambda: None
        torch.cuda.get_device_name = lambda: "cpu (smoke)"
    os.makedirs(args.out, exist_ok=True)
    import transformers
    RESULTS.update(command="python " + " ".join(sys.argv), device=torch.cuda.get_device_name(),
                   torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                   date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    RESULTS["matmul_8192_bf16_flops"] = matmul_peak()
    log("device", RESULTS["device"], "matmul TFLOP/s", RESULTS["matmul_8192_bf16_flops"] / 1e12)
    bs = tuple(int(b) for b in args.batches.split(","))
    fns = {"correctness": correctness, "bf16_same_weights": bf16_same_weights,
           "train": lambda: train_bench(bs, seq=128, iters=2) if args.smoke else train_bench(bs),
           "generate": lambda: gen_bench(4, 16, 16) if args.smoke else gen_bench()}
    for s in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            RESULTS["sections"][s] = fns[s]()
        except Exception:
            RESULTS["sections"][s] = {"error": traceback.format_exc()}
            log(traceback.format_exc())
        RESULTS["sections"][s]["section_wall_s"] = time.perf_counter() - t0
        log(s, json.dumps(RESULTS["sections"][s], default=str)[:3000])
        with open(os.path.join(args.out, "model_bench.json"), "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)


if __name__ == "__main__":
    main()
