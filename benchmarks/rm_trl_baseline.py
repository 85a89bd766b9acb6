"""Baseline (b) for benchmarks/rm_throughput.py: TRL's RewardTrainer on a transformers Llama of
GPT-2B-001's size (24 layers, hidden 2048, ffn 5440, 16 heads, 256k vocab; sequence-classification
head), bf16, random weights, HH's real pair lengths with random token ids. TRL's defaults: random
order, each micro-batch padded to its longest member. Prints one JSON line.

    python benchmarks/rm_trl_baseline.py --lengths benchmarks/rm/hh_lengths.json
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

PEAK = 989.4e12


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", required=True)
    ap.add_argument("--tokenizer", default=".carry/smolprep/tokenizer.json")
    ap.add_argument("--mbs", type=int, default=8)
    ap.add_argument("--accum", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast, TrainerCallback
    from trl import RewardConfig, RewardTrainer
    import trl

    lengths = json.load(open(args.lengths))["pairs"]
    rng = np.random.default_rng(0)
    n = (args.warmup + args.steps) * args.mbs * args.accum
    rows = [lengths[i % len(lengths)] for i in rng.permutation(max(n, len(lengths)))[:n]]
    data = Dataset.from_dict({"chosen_ids": [rng.integers(3, 49000, c).tolist() for c, _ in rows],
                              "rejected_ids": [rng.integers(3, 49000, r).tolist() for _, r in rows]})
    tok = PreTrainedTokenizerFast(tokenizer_file=args.tokenizer, eos_token="<|im_end|>", pad_token="<|im_end|>")
    cfg = LlamaConfig(vocab_size=256000, hidden_size=2048, intermediate_size=5440, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
                      tie_word_embeddings=False, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg).to("cuda")
    params = sum(p.numel() for p in model.parameters())
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    rargs = RewardConfig(output_dir="/tmp/trl_rm", per_device_train_batch_size=args.mbs,
                         gradient_accumulation_steps=args.accum, max_steps=args.warmup + args.steps, bf16=True,
                         learning_rate=9e-6, weight_decay=0.1, adam_beta2=0.98, max_grad_norm=1.0, logging_steps=1,
                         save_strategy="no", report_to="none", dataloader_num_workers=0, max_length=4096,
                         optim="adamw_torch_fused", seed=1234)
    trainer = RewardTrainer(model=model, args=rargs, train_dataset=data, processing_class=tok, callbacks=[Timer()])
    trainer.train()
    dt = sum(times[args.warmup:])
    pairs = args.steps * args.mbs * args.accum
    # real tokens: the pairs trained in the timed steps (the sampler is random: use the mean pair length)
    mean_pair = float(np.mean([c + r for c, r in rows]))
    mean_seq = mean_pair / 2
    fpt = 6 * (params - 256000 * 2048) + 3 * 4 * 24 * mean_seq * 2048  # matmuls + attention, as flops_per_token
    print(json.dumps({"name": "b_trl_rewardtrainer", "trl": trl.__version__, "pairs_per_s": pairs / dt,
                      "real_tokens_per_s": pairs * mean_pair / dt, "mfu_real": pairs * mean_pair * fpt / dt / PEAK,
                      "micro_batch_size": args.mbs, "global_batch_size": args.mbs * args.accum, "steps": args.steps,
                      "step_times": times, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}), flush=True)


if __name__ == "__main__":
    main()
