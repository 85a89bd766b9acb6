"""Reward-model stage configuration, shaped like NeMo-Aligner's training_rm.yaml.

The hands-on's overrides are the defaults here: 1 epoch, always_save_nemo, save_nemo_on_train_end,
rampup_batch_size null.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

# what every training stage shares (the optimizer, checkpoints, profiling): engine/config.py
from engine.config import (CheckpointCallbackParams, ExpManagerConfig, OptimConfig, PretrainedCheckpoint,  # noqa: F401
                           SchedConfig, TorchProfileConfig)


@dataclass
class RMLoopConfig:
    max_epochs: int = 1
    max_steps: int = -1
    val_check_interval: int = 100
    save_interval: int = 100
    limit_val_batches: Union[int, float] = 1.0  # float: fraction of the validation set; int: batches
    gradient_clip_val: float = 1.0
    train_random_sampler: bool = True
    val_random_sampler: bool = False
    log_every_n_steps: int = 1


@dataclass
class RMTrainerConfig:
    num_nodes: int = 1
    devices: int = 1
    accelerator: str = "auto"  # auto | gpu | cpu
    precision: str = "bf16"
    rm: RMLoopConfig = field(default_factory=RMLoopConfig)


@dataclass
class RMDataConfig:
    data_impl: str = "mmap"
    seq_length: int = 4096
    # {train: [prefix...], validation: [...], test: [...]}; all empty = the prep stage's output.
    # Megatron blending ([weight, prefix, weight, prefix]) is allowed in each list.
    data_prefix: Dict[str, Any] = field(default_factory=lambda: {"train": [], "validation": [], "test": []})
    # pairs longer than seq_length: truncate (keep the end of the dialogue) | drop
    overlong: str = "truncate"
    # length-aware batching (no padding to seq_length): windows of this many global batches are
    # sorted by pair length before being cut into global batches; 0 = random global batches
    length_grouping_window: int = 16
    # split a micro-batch whose padded size (2 x pairs x longest) exceeds this; null = never
    max_micro_batch_tokens: Optional[int] = None
    pad_to_multiple: int = 8  # round each micro-batch's padded length up (tensor-core friendly)
    # sequence packing: a rank's pairs of a global batch laid end to end (block-diagonal causal
    # attention, positions restart per document) in micro-batches of at most packed_tokens tokens,
    # instead of micro_batch_size padded pairs. Same global batch, same loss; micro_batch_size and
    # max_micro_batch_tokens are then unused.
    packing: bool = False
    packed_tokens: int = 16384
    packed_attention: str = "auto"  # auto (varlen on CUDA, else mask) | varlen | flex | mask


@dataclass
class RMModelConfig:
    micro_batch_size: int = 2
    global_batch_size: int = 64
    seed: int = 1234
    reward_model_type: str = "binary_ranking"
    rampup_batch_size: Optional[List[int]] = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: RMDataConfig = field(default_factory=RMDataConfig)
    torch_profile: TorchProfileConfig = field(default_factory=TorchProfileConfig)
    # NeMo's key: shard parameters, gradients and optimizer state over the data-parallel ranks (torch
    # FSDP2) instead of replicating them (DDP); for models whose training state does not fit one GPU
    fsdp: bool = False


@dataclass
class RMConfig:
    trainer: RMTrainerConfig = field(default_factory=RMTrainerConfig)
    exp_manager: ExpManagerConfig = field(default_factory=ExpManagerConfig)
    pretrained_checkpoint: PretrainedCheckpoint = field(default_factory=PretrainedCheckpoint)
    model: RMModelConfig = field(default_factory=RMModelConfig)
