"""python -m evaluation <reward model> <preferences> [out_dir]: the eval stage's reward-model
evaluation without the launcher (same code, same outputs)."""
import argparse
import logging
import sys

from evaluation.config import RewardEvalConfig
from evaluation.reward_eval import evaluate_reward_model

p = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__.split("\n")[0])
p.add_argument("reward_model", help=".nemo, extracted .nemo, or exported HF folder")
p.add_argument("data", help="HH or prompt/chosen/rejected JSONL(.gz), or a comparison mmap prefix")
p.add_argument("out_dir", nargs="?", default="eval_out")
p.add_argument("--max-pairs", type=int)
p.add_argument("--micro-batch-size", type=int, default=16)
a = p.parse_args()
logging.basicConfig(level=logging.INFO, format="%(message)s")
evaluate_reward_model(RewardEvalConfig(restore_from_path=a.reward_model, data=a.data, max_pairs=a.max_pairs,
                                       micro_batch_size=a.micro_batch_size), a.out_dir)
sys.exit(0)
