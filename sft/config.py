"""SFT stage configuration, shaped like NeMo-Aligner's gpt_sft.yaml (trainer.sft, model.data.train_ds /
validation_ds, model.optim, exp_manager).

Kit additions, where gpt_sft.yaml has no key: `model.data.data_prefix` (the prep stage's comparison
JSONL, whose chosen dialogues are the default training data; filled by the launcher), `packed_tokens`
beside NeMo's `packed_sequence`, and `answer_only_loss` given a meaning (NeMo: "not used right now").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from engine.config import CheckpointCallbackParams, ExpManagerConfig, OptimConfig, TorchProfileConfig


@dataclass
class SFTLoopConfig:
    max_epochs: int = 1
    max_steps: int = -1
    val_check_interval: int = 100  # steps; 0 = only at the end
    save_interval: int = 100  # steps; 0 = only at the end (and on SIGTERM/SIGUSR1)
    limit_val_batches: Any = 1.0  # float: fraction of the validation set; int: global batches
    gradient_clip_val: float = 1.0


@dataclass
class SFTTrainerConfig:
    num_nodes: int = 1
    devices: int = 1
    accelerator: str = "auto"
    precision: str = "bf16"
    sft: SFTLoopConfig = field(default_factory=SFTLoopConfig)


@dataclass
class SFTDatasetConfig:
    """One split. `file_path` null = the prep stage's chosen dialogues of that split (HH's format,
    loss on the assistant turns); a JSONL path = records whose fields fill `prompt_template`, the
    field `label_key` being the response (everything from it on carries the loss)."""
    file_path: Optional[str] = None
    global_batch_size: int = 128
    micro_batch_size: int = 1
    shuffle: bool = True
    max_seq_length: int = 2048
    min_seq_length: int = 1
    drop_last: bool = True
    label_key: str = "output"
    add_eos: bool = True
    add_bos: bool = False
    prompt_template: str = "{input} {output}"
    truncation_method: str = "right"  # a sample longer than max_seq_length loses its right | left end
    # several samples end to end in one row of at most packed_tokens (block-diagonal causal attention,
    # positions restart per sample, the loss never crosses samples); micro_batch_size is then unused
    packed_sequence: bool = False
    packed_tokens: int = 16384


@dataclass
class SFTDataConfig:
    # {train: [comparisons.jsonl], validation: [...], test: [...]}: the prep stage's comparison JSONL
    # (chosen dialogues are the even lines); used where a split's file_path is null
    data_prefix: Dict[str, Any] = field(default_factory=lambda: {"train": [], "validation": [], "test": []})
    train_ds: SFTDatasetConfig = field(default_factory=SFTDatasetConfig)
    validation_ds: SFTDatasetConfig = field(default_factory=lambda: SFTDatasetConfig(shuffle=False, drop_last=False))


@dataclass
class SFTModelConfig:
    seed: int = 1234
    restore_from_path: Optional[str] = None  # the base model (null = random init of the model keys)
    answer_only_loss: bool = True  # loss on the responses (HH: every assistant turn) only; false = every token
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-5, weight_decay=0.01))
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    torch_profile: TorchProfileConfig = field(default_factory=TorchProfileConfig)


@dataclass
class SFTConfig:
    trainer: SFTTrainerConfig = field(default_factory=SFTTrainerConfig)
    exp_manager: ExpManagerConfig = field(default_factory=lambda: ExpManagerConfig(
        name="megatron_gpt_sft",
        checkpoint_callback_params=CheckpointCallbackParams(
            monitor="val_loss", mode="min", save_top_k=1, always_save_nemo=False, save_nemo_on_train_end=True,
            filename="megatron_gpt_sft--{val_loss:.3f}-{step}")))
    model: SFTModelConfig = field(default_factory=SFTModelConfig)


TRUNCATION_METHODS = ("right", "left")
