#!/usr/bin/env bash
# Issue 8: data-parallel reward-model training (1 GPU vs 2 GPUs, same global batch, same seed) and PPO on
# 2 GPUs, all through the real launcher. On the device (nvidia-h200-x2), from the repo root:
#   bash benchmarks/multi_gpu_run.sh $OUT
# CPU rehearsal with the tiny model (gloo, 2 processes):
#   REHEARSAL=1 bash benchmarks/multi_gpu_run.sh /tmp/mg_out
# Writes $OUT/{rm_1gpu.jsonl,rm_2gpu.jsonl,ppo_2gpu.jsonl,manifest.json,log_*.txt} (8 files at most).
set -uo pipefail
OUT=${1:?usage: multi_gpu_run.sh OUT_DIR}
mkdir -p "$OUT"
RUN=${RUN:-/tmp/mg_run}
rm -rf "$RUN"
# NVLink multicast stays off (device README); the launcher passes the environment to every rank.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
STEPS=${STEPS:-40}
if [ -n "${REHEARSAL:-}" ]; then   # CPU: tiny model, gloo processes instead of GPUs
  MODEL=(model=tiny model.hidden_size=64 model.ffn_hidden_size=128 model.num_attention_heads=4 model.num_layers=2)
  DEV=cluster.processes_per_node; COMPILE=false; PPO_MODEL=("${MODEL[@]}"); T_RM1=300; T_RM2=300; T_PPO=300
else
  MODEL=(model=gpt_2b model.restore_from_path=null)
  DEV=cluster.gpus_per_node; COMPILE=true; PPO_MODEL=("${MODEL[@]}"); T_RM1=${T_RM1:-150}; T_RM2=${T_RM2:-120}; T_PPO=${T_PPO:-150}
  if [ -n "${SMOL:-}" ]; then  # SmolLM2-135M architecture for rm and ppo (eager: no compile warm-up)
    MODEL=(model=smollm2_135m model.restore_from_path=null); PPO_MODEL=("${MODEL[@]}"); COMPILE=false
  fi
fi
# The quickstart preset's learning rates are for the tiny model (rm 1e-3, actor 3e-3, 4 ppo epochs):
# put NeMo's training_rm.yaml / gpt_ppo values back.
LR=(rm.model.optim.lr=9e-6 rm.model.optim.weight_decay=0.1 rm.model.optim.sched.warmup_steps=10
    rm.model.optim.sched.constant_steps=1000 rm.model.optim.sched.min_lr=9e-7)
PPO_LR=(ppo.model.ppo.ppo_epochs=1 ppo.model.optim.lr=9e-7 ppo.model.optim.sched.warmup_steps=10
        ppo.model.optim.sched.constant_steps=1000 ppo.model.optim.sched.min_lr=9e-8 ppo.critic.optim.lr=9e-6
        ppo.critic.optim.sched.warmup_steps=10 ppo.critic.optim.sched.constant_steps=1000 ppo.critic.optim.sched.min_lr=9e-7)
COMMON=(run.dir="$RUN" data.source=local data.path=.carry/harmless-base-test.jsonl.gz
        data.tokenizer.library=sentencepiece data.tokenizer.model=null)
RM=("${LR[@]}" model.torch_compile=$COMPILE rm.model.global_batch_size=64 rm.model.seed=1234
    rm.model.data.max_micro_batch_tokens=16384 rm.model.data.length_grouping_window=64
    rm.trainer.rm.max_steps=$STEPS rm.trainer.rm.val_check_interval=$STEPS rm.trainer.rm.save_interval=$STEPS
    rm.trainer.rm.limit_val_batches=4 rm.exp_manager.checkpoint_callback_params.always_save_nemo=false)
py() { python3 launcher/main.py "$@"; }
t0=$(date +%s)
# 1) prep + rm on 1 GPU (micro batch = the whole global batch, split above 16384 padded tokens)
timeout $T_RM1 python3 launcher/main.py ${DRY:+dry_run=true} stage=prep,rm "${MODEL[@]}" "${COMMON[@]}" "${RM[@]}" $DEV=1 \
  rm.model.micro_batch_size=64 rm.exp_manager.explicit_log_dir=$RUN/rm_1gpu > "$OUT/log_rm_1gpu.txt" 2>&1
echo "rm 1gpu rc=$? $(( $(date +%s) - t0 ))s"; cp $RUN/rm_1gpu/metrics.jsonl "$OUT/rm_1gpu.jsonl"
# 2) rm on 2 GPUs: same global batch, each rank its 32 pairs
timeout $T_RM2 python3 launcher/main.py stage=rm "${MODEL[@]}" "${COMMON[@]}" "${RM[@]}" $DEV=2 \
  rm.model.micro_batch_size=32 rm.exp_manager.explicit_log_dir=$RUN/rm_2gpu > "$OUT/log_rm_2gpu.txt" 2>&1
echo "rm 2gpu rc=$? $(( $(date +%s) - t0 ))s"; cp $RUN/rm_2gpu/metrics.jsonl "$OUT/rm_2gpu.jsonl"
python3 benchmarks/multi_gpu_compare.py "$OUT/rm_1gpu.jsonl" "$OUT/rm_2gpu.jsonl" | tee "$OUT/compare.txt"
# 3) ppo on 2 GPUs against the reward model the 2-GPU rm run recorded in the manifest
timeout $T_PPO python3 launcher/main.py stage=ppo "${PPO_MODEL[@]}" "${COMMON[@]}" $DEV=2 model.torch_compile=false "${PPO_LR[@]}" \
  ppo.model.ppo.num_rollout_samples=64 ppo.model.ppo.rollout_micro_batch_size=32 ppo.model.ppo.length_params.max_length=128 \
  ppo.model.ppo.forward_micro_batch_size=8 ppo.model.ppo.offload_idle_models=true ppo.model.global_batch_size=64 \
  ppo.model.micro_batch_size=4 ppo.critic.global_batch_size=64 ppo.critic.micro_batch_size=8 \
  ppo.trainer.ppo.max_steps=${PPO_STEPS:-4} ppo.trainer.ppo.val_check_interval=0 ppo.trainer.ppo.save_interval=100 \
  ppo.exp_manager.explicit_log_dir=$RUN/ppo_2gpu > "$OUT/log_ppo_2gpu.txt" 2>&1
echo "ppo 2gpu rc=$? $(( $(date +%s) - t0 ))s"; cp $RUN/ppo_2gpu/metrics.jsonl "$OUT/ppo_2gpu.jsonl"
cp $RUN/manifest.json "$OUT/manifest.json"
python3 benchmarks/multi_gpu_compare.py --ppo "$OUT/ppo_2gpu.jsonl" | tee -a "$OUT/compare.txt"
