"""DPO stage configuration, shaped like NeMo-Aligner's gpt_dpo.yaml (trainer.dpo, model.dpo, model.data,
model.optim, exp_manager, pretrained_checkpoint).

Kit additions, where gpt_dpo.yaml has no key: `model.dpo.reference_free` (TRL's name), and
`model.data.packing` / `packed_tokens` / `pad_to_multiple` as in the rm stage.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from engine.config import (CheckpointCallbackParams, ExpManagerConfig, OptimConfig, PretrainedCheckpoint,
                                TorchProfileConfig)


@dataclass
class DPOLoopConfig:
    max_epochs: int = 1
    max_steps: int = -1
    val_check_interval: int = 100  # steps; 0 = only at the end
    save_interval: int = 100  # steps; 0 = only at the end (and on SIGTERM/SIGUSR1)
    limit_val_batches: Any = 1.0  # float: fraction of the validation pairs; int: global batches
    gradient_clip_val: float = 1.0


@dataclass
class DPOTrainerConfig:
    num_nodes: int = 1
    devices: int = 1
    accelerator: str = "auto"
    precision: str = "bf16"
    dpo: DPOLoopConfig = field(default_factory=DPOLoopConfig)


@dataclass
class DPOLossConfig:
    """NeMo-Aligner's model.dpo keys."""
    ref_policy_kl_penalty: float = 0.2  # beta
    preference_average_log_probs: bool = False  # mean instead of sum of a response's token log-probs
    sft_average_log_probs: Optional[bool] = None  # null = preference_average_log_probs
    gt_reward_scale: float = 1.0  # rpo_*: scale of the pairs' rewards
    preference_loss: str = "dpo"  # dpo | ipo | rpo_sq | rpo_bwd_kl | rpo_fwd_kl
    preference_loss_weight: float = 1.0
    sft_loss_weight: float = 0.0  # + this x the chosen responses' NLL
    reference_free: bool = False  # log pi_ref = 0: no reference model is built or kept


@dataclass
class DPODataConfig:
    data_impl: str = "jsonl"
    seq_length: int = 4096
    # {train: [...], validation: [...], test: [...]}: prep's {split}_comparisons.jsonl (all empty = the prep
    # stage's), or JSONL of {"prompt", "chosen", "rejected"} records (responses after the prompt)
    data_prefix: Dict[str, Any] = field(default_factory=lambda: {"train": [], "validation": [], "test": []})
    default_chosen_reward: float = 1.0  # rpo_*: rewards of a pair that has none
    default_rejected_reward: float = 0.0
    # chosen and rejected of a pair always run in one forward pass: padded rows [c0, r0, c1, r1, ...] of
    # micro_batch_size pairs, or with packing the documents end to end in rows of <= packed_tokens
    packing: bool = False
    packed_tokens: int = 16384
    pad_to_multiple: int = 8


@dataclass
class DPOModelConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 64
    seed: int = 1234
    dpo: DPOLossConfig = field(default_factory=DPOLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DPODataConfig = field(default_factory=DPODataConfig)
    torch_profile: TorchProfileConfig = field(default_factory=TorchProfileConfig)


@dataclass
class DPOConfig:
    trainer: DPOTrainerConfig = field(default_factory=DPOTrainerConfig)
    exp_manager: ExpManagerConfig = field(default_factory=lambda: ExpManagerConfig(
        name="megatron_gpt_dpo",
        checkpoint_callback_params=CheckpointCallbackParams(
            monitor="val_loss", mode="min", save_top_k=1, always_save_nemo=False, save_nemo_on_train_end=True,
            filename="megatron_gpt_dpo--{val_loss:.3f}-{step}")))
    # the initial policy, which is also the frozen reference (null = model.restore_from_path, else the
    # sft stage's .nemo recorded in the run's manifest)
    pretrained_checkpoint: PretrainedCheckpoint = field(default_factory=PretrainedCheckpoint)
    model: DPOModelConfig = field(default_factory=DPOModelConfig)
