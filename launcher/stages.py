"""The stage registry: which package runs a stage, what it consumes from earlier stages, and which
config sections decide whether its recorded artifacts are still valid. No stage logic lives here."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, List, Tuple

from launcher.config import STAGES


# A stage that saved a checkpoint on SIGTERM/SIGUSR1 exits with this (EX_TEMPFAIL): "run me again".
# Stage packages raise SystemExit(75); the runner requeues (Slurm) or records the stop (local).
from engine.preemption import PREEMPTED_EXIT as EX_TEMPFAIL  # noqa: E402 - one definition, engine's


@dataclass(frozen=True)
class Input:
    key: str  # config key the artifact fills (when the user left it null)
    producer: str  # stage that produces it
    artifact: str  # artifact name in the producer's result
    always: bool = False  # fill even when set (the tokenizer the data was actually tokenized with)
    # how a producer's artifact maps onto the key (e.g. a path onto a NeMo data_prefix dict of lists)
    shape: str = "as_is"
    required: bool = True


@dataclass(frozen=True)
class Stage:
    name: str
    package: str
    sections: Tuple[str, ...]  # config sections that define the stage's result
    inputs: Tuple[Input, ...] = field(default_factory=tuple)
    distributed: bool = True  # False: one process, no GPU, whatever the cluster offers (prep)
    in_all: bool = True  # part of stage=all (eval is asked for by name: stage=all,eval or stage=eval)
    # what validation checks before launch (launcher/validate.py reads these; nothing is named twice):
    # a training stage runs the engine's loop from its section: <name>.trainer.<name> (run length,
    # intervals), <name>.trainer devices, the optimizers below, <name>.model.torch_profile
    trainer: bool = False
    optimizers: Tuple[str, ...] = ()  # optimizer config nodes (lr, schedule checks)
    batches: Tuple[str, ...] = ()  # nodes with global_batch_size and micro_batch_size (data-parallel split)
    checkpoints: Tuple[str, ...] = ()  # keys naming a checkpoint the stage loads (must exist and be readable)
    files: Tuple[str, ...] = ()  # keys naming a file or data prefix the stage reads (must exist)
    memory_keys: Tuple[str, ...] = ()  # what lowers the stage's peak memory (said when it is killed for memory)

    def entry(self) -> Callable:
        return importlib.import_module(self.package).run


REGISTRY = {
    "prep": Stage("prep", "data_prep", ("data",), distributed=False, memory_keys=("data.workers", "data.max_pairs")),
    "sft": Stage("sft", "sft", ("model", "sft"), (
        Input("sft.model.data.data_prefix", "prep", "comparisons", shape="split_lists"),
        Input("data.tokenizer.model", "prep", "tokenizer", always=True, required=False),
    ), in_all=False, trainer=True, optimizers=("sft.model.optim",), batches=("sft.model.data.train_ds",),
        checkpoints=("model.restore_from_path",),
        memory_keys=("sft.model.data.train_ds.micro_batch_size", "sft.model.data.train_ds.max_seq_length")),
    "rm": Stage(
        "rm",
        "rm_training",
        ("model", "rm"),
        (
            Input("rm.model.data.data_prefix", "prep", "data_prefix", shape="split_lists"),
            Input("data.tokenizer.model", "prep", "tokenizer", always=True, required=False),
        ),
        trainer=True,
        optimizers=("rm.model.optim",),
        batches=("rm.model",),
        checkpoints=("model.restore_from_path",),
        memory_keys=("rm.model.micro_batch_size", "rm.model.data.packed_tokens (with packing)",
                     "rm.model.data.seq_length", "model.activation_memory_budget"),
    ),
    "dpo": Stage("dpo", "dpo", ("model", "dpo"), (
        Input("dpo.model.data.data_prefix", "prep", "comparisons", shape="split_lists"),
        Input("data.tokenizer.model", "prep", "tokenizer", always=True, required=False),
        Input("dpo.pretrained_checkpoint.restore_from_path", "sft", "nemo", required=False),
    ), in_all=False, trainer=True, optimizers=("dpo.model.optim",), batches=("dpo.model",),
        checkpoints=("model.restore_from_path",), memory_keys=("dpo.model.micro_batch_size", "dpo.model.data.seq_length")),
    "ppo": Stage(
        "ppo",
        "ppo",
        ("model", "ppo"),
        (
            Input("ppo.model.data.data_prefix", "prep", "prompts", shape="split_lists"),
            Input("data.tokenizer.model", "prep", "tokenizer", always=True, required=False),
            Input("ppo.reward_model.restore_from_path", "rm", "nemo"),
            # the initial policy from sft when this key is null (ppo.pretrained_checkpoint.restore_from_path=null)
            Input("ppo.pretrained_checkpoint.restore_from_path", "sft", "nemo", required=False),
        ),
        trainer=True,
        optimizers=("ppo.model.optim", "ppo.critic.optim"),
        batches=("ppo.model", "ppo.critic"),
        checkpoints=("model.restore_from_path",),
        memory_keys=("ppo.model.ppo.rollout_micro_batch_size", "ppo.model.ppo.forward_micro_batch_size",
                     "ppo.model.micro_batch_size", "ppo.critic.micro_batch_size", "ppo.model.ppo.offload_idle_models=true"),
    ),
    "eval": Stage("eval", "evaluation", ("eval",), (
        Input("eval.rm.data_prefix", "prep", "data_prefix", required=False),
        Input("eval.rm.restore_from_path", "rm", "nemo"),
        Input("eval.policy.restore_from_path", "ppo", "nemo", required=False),
        Input("eval.policy.prompts", "prep", "prompts", required=False),
    ), in_all=False,
        checkpoints=("eval.policy.reference_path",),
        files=("eval.rm.data",),
        memory_keys=("eval.rm.micro_batch_size", "eval.rm.seq_length", "eval.policy.micro_batch_size")),
}
assert tuple(REGISTRY) == STAGES


def parse_stage_selection(value) -> List[str]:
    """`all` | a stage | a comma list | a list; returned in pipeline order."""
    items = list(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig" else [value]
    names = [s.strip() for item in items for s in str(item).split(",") if s.strip()]
    if "all" in names:  # all = the training pipeline; other stages join it by name (all,eval)
        names = [s for s in names if s != "all"] + [s for s in STAGES if REGISTRY[s].in_all]
    unknown = [n for n in names if n not in STAGES]
    if unknown or not names:
        raise ValueError(f"stage={value!r}: unknown stage {unknown[0] if unknown else ''!r}; "
                         f"choose from {', '.join(STAGES)}, all (or a comma list such as rm,ppo)")
    return [s for s in STAGES if s in names]


def shape_artifact(value, shape: str):
    """Producer artifact -> the form the consuming key expects."""
    if shape == "split_lists" and isinstance(value, dict):
        return {split: [p] if isinstance(p, str) else list(p) for split, p in value.items()}
    return value
