"""Reward-model stage configuration, shaped like NeMo-Aligner's training_rm.yaml.

The hands-on's overrides are the defaults here: 1 epoch, always_save_nemo, save_nemo_on_train_end,
rampup_batch_size null.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union


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
class CheckpointCallbackParams:
    monitor: str = "val_loss"
    save_top_k: int = 3
    mode: str = "min"
    always_save_nemo: bool = True
    save_nemo_on_train_end: bool = True
    filename: str = "megatron_gpt--{val_loss:.3f}-{step}"
    save_last: bool = True


@dataclass
class ExpManagerConfig:
    explicit_log_dir: Optional[str] = None  # null = the stage folder in the run directory
    name: str = "megatron_gpt"
    resume_if_exists: bool = True
    create_checkpoint_callback: bool = True
    checkpoint_callback_params: CheckpointCallbackParams = field(default_factory=CheckpointCallbackParams)


# optim.sched.name values the scheduler knows (null = constant); the launcher checks them
from engine.schedule import COSINE_SCHEDULE, CONSTANT_SCHEDULES, SCHEDULE_NAMES  # noqa: E402,F401


@dataclass
class SchedConfig:
    name: str = "CosineAnnealing"
    warmup_steps: int = 10
    constant_steps: int = 1000  # NeMo: min_lr held for this many steps at the END of the schedule
    min_lr: float = 9e-7
    # the launcher refuses a schedule that would sit at min_lr for most of the run (engine/schedule.py);
    # true = run it as it is
    allow_min_lr_hold: bool = False


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 9e-6
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    # data-parallel gradient all-reduce dtype (NeMo's distributed_fused_adam key): null = fp32 | bf16
    grad_sync_dtype: Optional[str] = None
    sched: SchedConfig = field(default_factory=SchedConfig)


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
class TorchProfileConfig:
    """torch.profiler trace of optimizer steps start_step..end_step (1-based) on the listed ranks,
    written to <stage>/profile/ (rm_training/profiling.py)."""
    enabled: bool = False
    start_step: int = 10
    end_step: int = 12
    ranks: List[int] = field(default_factory=lambda: [0])


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
class PretrainedCheckpoint:
    restore_from_path: Optional[str] = None


@dataclass
class RMConfig:
    trainer: RMTrainerConfig = field(default_factory=RMTrainerConfig)
    exp_manager: ExpManagerConfig = field(default_factory=ExpManagerConfig)
    pretrained_checkpoint: PretrainedCheckpoint = field(default_factory=PretrainedCheckpoint)
    model: RMModelConfig = field(default_factory=RMModelConfig)
