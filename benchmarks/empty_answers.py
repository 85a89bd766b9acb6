"""Share of empty answers in stage=eval's policy_samples.jsonl(.gz) files, and the reward they got.

An answer is empty when, with the end strings taken out, only white space is left (what stage=eval now reports
as policy_empty; this reads the samples of runs made before it did).
  python benchmarks/empty_answers.py benchmarks/alignment_smollm2/*.policy_samples.jsonl.gz
"""
import gzip
import json
import sys

import numpy as np

ENDS = ["<|endoftext|>", "<|im_end|>", "\n\nUser:"]


def is_empty(text: str) -> bool:
    for s in ENDS:
        text = text.replace(s, "")
    return not text.strip()


print("| samples | prompts | policy empty | reward of empty answers | reward of the others | win rate of the others |")
print("|---|---|---|---|---|---|")
for path in sys.argv[1:]:
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    e = np.array([is_empty(r["policy"]) for r in rows])
    rp = np.array([r["reward_policy"] for r in rows])
    rr = np.array([r["reward_reference"] for r in rows])
    win = np.where(rp > rr, 1.0, np.where(rp == rr, 0.5, 0.0))
    fmt = lambda a: f"{a.mean():.3f}" if a.size else "-"  # noqa: E731
    print(f"| {path.split('/')[-1]} | {len(rows)} | {e.mean():.3f} | {fmt(rp[e])} | {fmt(rp[~e])} | {fmt(win[~e])} |")
