#!/usr/bin/env bash
# Issue 8, call 4 (nvidia-h200-x2): link probe, GPT-2B rm 1 GPU vs 2 GPUs (bf16 and fp32 gradient
# all-reduce) at NeMo's learning rate, then PPO with GPT-2B on 2 GPUs against that rm. Each part has
# its own time limit and a part is skipped when the call's deadline (DEADLINE s) would pass.
#   bash benchmarks/multi_gpu_gpt2b.sh $OUT
# Knobs (next call, prepared): FSDP=1 (rm.model.fsdp on every 2-GPU run), FSDP_RUN=1 (one more 2-GPU run
# with FSDP, after the DDP one), PACK=1 (sequence packing, PACK_TOKENS=32768 per micro-batch, memory budget
# BUDGET=0.7: the preset's setting), PROFILE=1 (torch.profiler
# trace of steps PROF_A..PROF_B on every rank, copied to $OUT as profile_<run>.tgz), WARMUP (steps excluded
# from throughput, default 10), SKIP_PPO=1, SKIP_FP32=1, STEPS.
#   PACK=1 PROFILE=1 FSDP_RUN=1 STEPS=50 WARMUP=25 SKIP_PPO=1 SKIP_FP32=1 NOPROBE=1 bash benchmarks/multi_gpu_gpt2b.sh $OUT
set -uo pipefail
OUT=${1:?usage: multi_gpu_gpt2b.sh OUT_DIR}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
RUN=${RUN:-/dev/shm/mg_run}; rm -rf "$RUN"; mkdir -p "$RUN"
T0=$(date +%s); DEADLINE=${DEADLINE:-570}
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
STEPS=${STEPS:-30}
MODEL=(model=gpt_2b model.restore_from_path=null); GPUKEY=cluster.gpus_per_node; COMPILE=true
if [ -n "${REHEARSAL:-}" ]; then  # CPU: tiny model, gloo processes (checks the script, not the numbers)
  MODEL=(model=tiny model.hidden_size=64 model.ffn_hidden_size=128 model.num_attention_heads=4 model.num_layers=2)
  GPUKEY=cluster.processes_per_node; COMPILE=false; NOPROBE=1
fi
COMMON=(run.dir="$RUN" data.source=local data.path=.carry/harmless-base-test.jsonl.gz
        data.tokenizer.library=sentencepiece data.tokenizer.model=null)
RM=(rm.model.optim.lr=9e-6 rm.model.optim.weight_decay=0.1 rm.model.optim.sched.warmup_steps=10
    rm.model.optim.sched.constant_steps=1000 rm.model.optim.sched.min_lr=9e-7
    model.torch_compile=$COMPILE rm.model.global_batch_size=64 rm.model.seed=1234
    rm.model.data.max_micro_batch_tokens=16384 rm.model.data.length_grouping_window=64
    rm.trainer.rm.max_steps=$STEPS rm.trainer.rm.val_check_interval=$STEPS rm.trainer.rm.save_interval=$STEPS
    rm.trainer.rm.limit_val_batches=4 rm.exp_manager.checkpoint_callback_params.always_save_nemo=false)
# the gpt2b_hh preset's packing since 2026-12-01: 32k-token packs within 62 GiB thanks to the memory budget
[ -n "${PACK:-}" ] && RM+=(rm.model.data.packing=true rm.model.data.packed_tokens=${PACK_TOKENS:-32768}
                           model.activation_memory_budget=${BUDGET:-0.7})
[ -n "${FSDP:-}" ] && RM+=(rm.model.fsdp=true)   # only the multi-process runs shard; 1 process stays plain
[ -n "${PROFILE:-}" ] && RM+=(rm.model.torch_profile.enabled=true rm.model.torch_profile.start_step=${PROF_A:-40}
                              rm.model.torch_profile.end_step=${PROF_B:-41} "rm.model.torch_profile.ranks=[0,1]")
WARMUP=${WARMUP:-10}
[ -z "${NOPROBE:-}" ] && python3 benchmarks/multi_gpu_allreduce_probe.py --out "$OUT/allreduce.json" 2>&1 | grep -v -i warn | tail -3
echo "probe done at $(( $(date +%s) - T0 ))s"
rm_run() {  # name gpus mbs extra...
  local name=$1 g=$2 mbs=$3; shift 3
  local lim=$(( $(left) < ${T_RM:-150} ? $(left) : ${T_RM:-150} ))
  if [ "$lim" -lt 60 ]; then echo "skip $name: ${lim}s left"; return; fi
  timeout $lim python3 launcher/main.py stage=${STAGES:-rm} "${MODEL[@]}" "${COMMON[@]}" "${RM[@]}" $GPUKEY=$g \
    rm.model.micro_batch_size=$mbs rm.exp_manager.explicit_log_dir=$RUN/$name "$@" > "$RUN/log_$name.txt" 2>&1
  echo "$name rc=$? at $(( $(date +%s) - T0 ))s"; cp $RUN/$name/metrics.jsonl "$OUT/$name.jsonl"
  if [ -d "$RUN/$name/profile" ]; then  # tables always; traces only if they come back (16 MB a file)
    (cd "$RUN/$name" && tar czf "$OUT/profile_$name.tgz" profile/*.txt && tar czf "$OUT/trace_$name.tgz" profile/*.json)
  fi
  tail -4 "$RUN/log_$name.txt" | cut -c1-300
}
STAGES=prep,rm rm_run rm_1gpu 1 64
rm -rf $RUN/rm_1gpu/checkpoints/*.pt
rm_run rm_2gpu_bf16 2 32 rm.model.optim.grad_sync_dtype=bf16
python3 benchmarks/multi_gpu_compare.py --warmup $WARMUP "$OUT/rm_1gpu.jsonl" "$OUT/rm_2gpu_bf16.jsonl" > "$OUT/compare.txt" 2>&1; tail -4 "$OUT/compare.txt"
if [ -n "${FSDP_RUN:-}" ]; then  # the same 2-GPU run sharded with FSDP2 (bf16 reduce-scatter), no profile
  rm_run rm_2gpu_fsdp 2 32 rm.model.fsdp=true rm.model.optim.grad_sync_dtype=bf16 rm.model.torch_profile.enabled=false
  python3 benchmarks/multi_gpu_compare.py --warmup $WARMUP "$OUT/rm_1gpu.jsonl" "$OUT/rm_2gpu_fsdp.jsonl" > "$OUT/compare_fsdp.txt" 2>&1; tail -4 "$OUT/compare_fsdp.txt"
fi
lim=$(( $(left) < ${T_PPO:-170} ? $(left) : ${T_PPO:-170} ))
if [ "$lim" -ge 60 ] && [ -z "${SKIP_PPO:-}" ]; then
timeout $lim python3 launcher/main.py stage=ppo "${MODEL[@]}" "${COMMON[@]}" $GPUKEY=2 model.torch_compile=false \
  ppo.model.ppo.ppo_epochs=1 ppo.model.optim.lr=9e-7 ppo.critic.optim.lr=9e-6 \
  ppo.model.optim.sched.min_lr=9e-8 ppo.critic.optim.sched.min_lr=9e-7 \
  ppo.model.ppo.num_rollout_samples=64 ppo.model.ppo.rollout_micro_batch_size=32 ppo.model.ppo.length_params.max_length=256 \
  ppo.model.ppo.forward_micro_batch_size=16 ppo.model.ppo.offload_idle_models=false ppo.model.global_batch_size=64 \
  ppo.model.micro_batch_size=8 ppo.critic.global_batch_size=64 ppo.critic.micro_batch_size=16 \
  ppo.model.optim.grad_sync_dtype=bf16 ppo.critic.optim.grad_sync_dtype=bf16 \
  ppo.trainer.ppo.max_steps=${PPO_STEPS:-5} ppo.trainer.ppo.val_check_interval=0 ppo.trainer.ppo.save_interval=100 \
  ppo.exp_manager.explicit_log_dir=$RUN/ppo_2gpu > "$RUN/log_ppo_2gpu.txt" 2>&1
echo "ppo 2gpu rc=$? at $(( $(date +%s) - T0 ))s"; cp $RUN/ppo_2gpu/metrics.jsonl "$OUT/ppo_2gpu.jsonl"
python3 benchmarks/multi_gpu_compare.py --ppo "$OUT/ppo_2gpu.jsonl" >> "$OUT/compare.txt" 2>&1; tail -8 "$OUT/compare.txt"
tail -5 "$RUN/log_ppo_2gpu.txt" | cut -c1-300
else echo "skip ppo: ${lim}s left"; fi
[ -z "${SKIP_FP32:-}" ] && rm_run rm_2gpu_fp32 2 32
[ -f "$OUT/rm_2gpu_fp32.jsonl" ] && python3 benchmarks/multi_gpu_compare.py --warmup $WARMUP "$OUT/rm_1gpu.jsonl" "$OUT/rm_2gpu_fp32.jsonl" > "$OUT/compare_fp32.txt" 2>&1 && tail -3 "$OUT/compare_fp32.txt"
tar czf "$OUT/logs.tgz" -C "$RUN" $(cd $RUN && ls log_*.txt manifest.json) 2>/dev/null
echo "all done at $(( $(date +%s) - T0 ))s"
