#!/bin/bash
# Every training stage of the kit through its own entry point (python launcher/main.py stage=...) at the
# GPT-2B configuration (experiment=gpt2b_hh's settings, GPT-2B-001's architecture at random init: the
# checkpoint is not available here) on one GPU, on real HH data (harmless-base test file). Prints one JSON
# line per measurement: rm pairs/s and tokens/s, eval pairs/s, export time and peak RSS, SFT and DPO tokens/s,
# PPO (GAE with a critic) and GRPO (no critic) step time and peak GPU memory. Results: benchmarks/stages_gpu.md
# Inputs travel in .carry/ (git-ignored): whl/ (hydra-core, omegaconf, antlr4, submitit wheels),
# harmless-base-test.jsonl.gz, smol_tok/ (SmolLM2's tokenizer.json; GPT-2B-001's sentencepiece is not here).
# Run (the `run` tool, carry [".carry"]):  bash benchmarks/gpt2b_stages_gpu.sh
# CPU rehearsal: MODEL="model=tiny" STEPS=2 EXTRA="<smaller batches>" bash benchmarks/gpt2b_stages_gpu.sh
set -u
PY=${PYTHON:-python3}
R=${RUN_DIR:-/tmp/gpt2b_stages}
OUT=${OUT:-$R/out}
STEPS=${STEPS:-20}       # rm/sft/dpo optimizer steps; the mean is taken over the second half (after compile)
PPO_STEPS=${PPO_STEPS:-4}
MODEL=${MODEL:-model=gpt_2b model.torch_compile=true model.activation_memory_budget=0.7}
mkdir -p "$OUT"
[ -d .carry/whl ] && $PY -m pip install -q --no-deps --no-index .carry/whl/*.whl 2>&1 | grep -v WARN | tail -1
COMMON="experiment=gpt2b_hh cluster=local cluster.gpus_per_node=1 $MODEL model.restore_from_path=null
  data.source=local data.path=.carry/harmless-base-test.jsonl.gz data.tokenizer.library=huggingface
  data.tokenizer.model=.carry/smol_tok data.workers=8 run.dir=$R ${EXTRA:-}"
summary_() {  # stage dir, label: mean throughput over the second half of the training rows
  $PY - "$1" "$2" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
for r in rows:  # rm/sft/dpo write step_time; ppo writes time_step with its parts
    if "time_step" in r:
        r["step_time"] = r["time_step"]
tr = [r for r in rows if r.get("split", "train") == "train" and "step_time" in r]
t = tr[len(tr) // 2:] or tr
# a step over 3x the median is a recompile (a new packed shape): counted, left out of the steady figures
med = sorted(r["step_time"] for r in t)[len(t) // 2]
slow = [r["step"] for r in t if r["step_time"] > 3 * med]
t = [r for r in t if r["step"] not in slow]
T = sum(r["step_time"] for r in t)
out = {"what": sys.argv[2], "steps": f"{t[0]['step']}-{t[-1]['step']}", "left_out_recompile_steps": slow,
       "step_time_s": round(T / len(t), 4),
       "peak_mem_gib": max((r.get("peak_mem_gib") or 0) for r in rows)}
for k in ("pairs", "tokens", "samples"):
    if all(k in r for r in t):
        out[k + "_per_s"] = round(sum(r[k] for r in t) / T, 1)
for k in ("time_generation", "time_scoring", "time_training", "generation_tokens_per_s", "response_length"):
    if all(k in r for r in t):
        out[k] = round(sum(r[k] for r in t) / len(t), 3)
print(json.dumps(out), flush=True)
PY
}
summary() { [ -f "$1/metrics.jsonl" ] && summary_ "$@" 2>&1 | tee -a "$OUT/results.jsonl"; }
run() {  # label, timeout, stage overrides...
  local label=$1 lim=$2; shift 2
  case " ${ONLY:-$label} " in *" $label "*) ;; *) return 0 ;; esac  # ONLY="rm ppo_gae": just those
  local t0=$(date +%s)
  timeout "$lim" $PY launcher/main.py $COMMON "$@" > "$OUT/$label.log" 2>&1
  echo "{\"what\": \"$label\", \"rc\": $?, \"wall_s\": $(( $(date +%s) - t0 ))}" | tee -a "$OUT/results.jsonl"
}
TRAIN="max_epochs=-1 max_steps=$STEPS val_check_interval=0 save_interval=0"
run rm 140 stage=prep,rm $(for k in $TRAIN; do echo rm.trainer.rm.$k; done) \
    rm.exp_manager.checkpoint_callback_params.always_save_nemo=false
summary $R/rm "rm pairs/s (stage=rm, packed 32768, compiled)"
run eval 60 stage=eval eval.policy.enabled=false eval.rm.data=.carry/harmless-base-test.jsonl.gz eval.rm.micro_batch_size=64
grep -h '"pairs_per_s"' $R/eval/*.json 2>/dev/null | head -1 | cut -c1-400 | tee -a "$OUT/results.jsonl"
# a 3-step run: no warmup, no constant_steps tail (the launcher refuses the preset schedule for so short a run)
# as benchmarks/ppo.md's step: 64 rollouts, one optimizer step of 64 each for actor and critic, up to 256 tokens
PPO="ppo.trainer.ppo.max_steps=$PPO_STEPS ppo.trainer.ppo.val_check_interval=0 ppo.trainer.ppo.save_interval=0
  ppo.model.ppo.num_rollout_samples=64 ppo.model.global_batch_size=64 ppo.critic.global_batch_size=64
  ppo.model.ppo.ppo_epochs=1 ppo.model.ppo.length_params.max_length=256
  ppo.model.optim.sched.warmup_steps=0 ppo.model.optim.sched.constant_steps=0
  ppo.critic.optim.sched.warmup_steps=0 ppo.critic.optim.sched.constant_steps=0"
run ppo_gae 100 stage=ppo $PPO
summary $R/ppo "ppo GAE step (critic, 64 responses of 64 prompts)"
# a GPT-2B PPO checkpoint (actor + critic with their optimizer states) is ~40 GB: two fill a 64 GiB disk
[ -d $R/ppo ] && rm -rf $R/ppo_gae $R/ppo/checkpoints && mv $R/ppo $R/ppo_gae
run ppo_grpo 90 stage=ppo $PPO force=true ppo.model.ppo.advantage_estimator=grpo ppo.model.ppo.num_rollouts_per_prompt=4
summary $R/ppo "ppo GRPO step (no critic, 64 responses: 16 prompts x 4)"
rm -rf $R/ppo/checkpoints
NEMO=$(ls $R/rm/checkpoints/*.nemo $R/rm/*.nemo 2>/dev/null | head -1)
if [ -z "${SKIP_EXPORT:-}" ]; then
  { $PY - "$NEMO" "$OUT/export.log" <<'PY'
import json, os, resource, subprocess, sys, time
nemo, log = sys.argv[1:]
t = time.perf_counter()
rc = subprocess.call(["timeout", "90", sys.executable, "-m", "modeling.export", nemo, "/tmp/gpt2b_hf"], stdout=open(log, "w"),
                     stderr=subprocess.STDOUT)
hf = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk("/tmp/gpt2b_hf") for f in fs)
print(json.dumps({"what": "export (python -m modeling.export, .nemo -> HF safetensors)", "rc": rc,
                  "wall_s": round(time.perf_counter() - t, 1), "nemo_bytes": os.path.getsize(nemo), "hf_bytes": hf,
                  "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)}))
PY
  } | tee -a "$OUT/results.jsonl"
fi
run sft 120 stage=sft $(for k in $TRAIN; do echo sft.trainer.sft.$k; done) sft.exp_manager.checkpoint_callback_params.always_save_nemo=false
summary $R/sft "sft tokens/s (stage=sft, packed 32768, compiled)"
run dpo 130 stage=dpo $(for k in $TRAIN; do echo dpo.trainer.dpo.$k; done) dpo.exp_manager.checkpoint_callback_params.always_save_nemo=false
summary $R/dpo "dpo tokens/s (stage=dpo, packed 32768, compiled)"
tail -n 3 $OUT/*.log | cut -c1-300
for d in rm eval ppo_gae ppo sft dpo; do  # the raw rows beside the figures
  [ -f $R/$d/metrics.jsonl ] && cp $R/$d/metrics.jsonl "$OUT/$d.metrics.jsonl"
  [ -f $R/$d/log.txt ] && cp $R/$d/log.txt "$OUT/$d.stage_log.txt"
done
cp $R/eval/*.json "$OUT/" 2>/dev/null
true
