"""`eval:` section (conf/eval/default.yaml): what to score and how. Keys mirror the dataclass fields."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional


@dataclass
class RewardEvalConfig:
    enabled: bool = True
    # the reward model: a .nemo (null = the rm stage's, through the manifest), an extracted .nemo or an
    # exported HF folder (python -m modeling.export)
    restore_from_path: Optional[str] = None
    # the preference set: HH-format JSONL(.gz) (chosen/rejected dialogues), prompt/chosen/rejected JSONL
    # with an optional `subset` (RewardBench's layout), or a comparison mmap prefix. null = data_prefix
    data: Optional[str] = None
    data_prefix: Any = None  # prep's data_prefix ({train, validation, test}); its `split` is used when data is null
    split: str = "test"
    # prompt/chosen/rejected records: how a prompt and a response become one text. null = as prep writes
    # HH ("User: {prompt}\n\nAssistant: {response}", or prompt + " " + response when the prompt
    # already ends with "Assistant:")
    template: Optional[str] = None
    max_pairs: Optional[int] = None  # null = all
    seq_length: Optional[int] = None  # null = the reward model's encoder_seq_length; longer pairs are skipped and counted
    micro_batch_size: int = 16  # sequences per forward (sorted by length: little padding), when not packed
    # packed scoring: sequences end to end in rows of at most packed_tokens tokens (block-diagonal attention,
    # no padding), the rm stage's packed forward. auto = on a GPU (the CPU's explicit mask costs T^2)
    packing: str = "auto"  # auto | true | false
    packed_tokens: int = 32768
    bootstrap_samples: int = 1000  # for the 95% interval of each accuracy
    seed: int = 1234
    precision: str = "bf16"  # on a GPU; the CPU computes in fp32


@dataclass
class PolicyEvalConfig:
    enabled: bool = True  # runs when a policy is known (the ppo stage's .nemo, or restore_from_path)
    restore_from_path: Optional[str] = None  # the policy; null = the ppo stage's .nemo
    reference_path: Optional[str] = None  # null = model.restore_from_path (PPO's initial policy)
    prompts: Any = None  # a prompts JSONL ({"text"} or {"prompt"}); null = prep's prompts, its `split`
    split: str = "test"
    max_prompts: int = 64
    max_length: int = 64  # new tokens per response (NeMo's length_params.max_length)
    # no response ends before this many tokens (NeMo's length_params.min_length); null = the one PPO trained
    # with (ppo.model.ppo.length_params.min_length). A policy trained under a minimum learns nothing about
    # ending before it: scored without it (0), it may answer with nothing at all
    min_length: Optional[int] = None
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    micro_batch_size: int = 8
    seed: int = 1234
    # what ends a response; null = ppo.model.ppo.sampling_params.end_strings, and where that is null too,
    # PPO's default: the tokenizer's EOS and end-of-turn tokens and the prompt format's next turn
    end_strings: Optional[List[str]] = None


@dataclass
class EvalConfig:
    rm: RewardEvalConfig = field(default_factory=RewardEvalConfig)
    policy: PolicyEvalConfig = field(default_factory=PolicyEvalConfig)


def nothing_to_evaluate(rm_enabled: bool, policy_enabled: bool, policy_known: bool) -> Optional[str]:
    """What is missing when stage eval would evaluate nothing (the launcher's check and the stage's own)."""
    if rm_enabled or (policy_enabled and policy_known):
        return None
    return ("stage eval has nothing to evaluate: eval.rm.enabled=false, and no policy (eval.policy."
            + ("enabled=false" if not policy_enabled else "restore_from_path is null and this run's manifest "
               "records no ppo .nemo: run stage ppo first, or set it to a policy .nemo / HF folder") + ")")
