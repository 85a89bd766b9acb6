"""The config dataclasses every training stage shares (NeMo's key names), and the one way from the
composed config to a stage's typed config.

    rm: RMConfig = typed(cfg.rm, RMConfig)        # a DictConfig, a dict or already an RMConfig
    optim = typed({"lr": 1e-3}, OptimConfig)       # unset keys: the dataclass defaults

Defaults live here, in the dataclasses; the shipped YAML (conf/rm, conf/ppo) overrides them and a
test checks that every YAML key exists here (tests/test_engine.py). Torch-free: the launcher
imports it to check a run before anything runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Type, TypeVar

from .schedule import COSINE_SCHEDULE, CONSTANT_SCHEDULES, SCHEDULE_NAMES  # noqa: F401 (re-exported)

T = TypeVar("T")


@dataclass
class SchedConfig:
    name: Optional[str] = "CosineAnnealing"  # CosineAnnealing | constant | null (= constant)
    warmup_steps: int = 10
    constant_steps: int = 1000  # NeMo: min_lr held for this many steps at the END of the schedule
    min_lr: float = 9e-7
    # the launcher refuses a schedule that would sit at min_lr for most of the run (engine/schedule.py);
    # true = run it as it is
    allow_min_lr_hold: bool = False


@dataclass
class OptimConfig:
    """AdamW's every key (engine/optim.py builds it from this and nothing else)."""
    name: str = "adamw"  # adamw | adam | fused_adam | distributed_fused_adam: all AdamW
    lr: float = 9e-6
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    # data-parallel gradient all-reduce dtype (NeMo's distributed_fused_adam key): null = fp32 | bf16
    grad_sync_dtype: Optional[str] = None
    sched: Optional[SchedConfig] = field(default_factory=SchedConfig)  # null = constant lr


@dataclass
class CheckpointCallbackParams:
    monitor: str = "val_loss"
    save_top_k: int = 3  # NeMo/PTL: -1 keeps every checkpoint, 0 none but the newest (resume)
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


@dataclass
class TorchProfileConfig:
    """torch.profiler trace of optimizer steps start_step..end_step (1-based) on the listed ranks,
    written to <stage>/profile/ (engine/profiling.py)."""
    enabled: bool = False
    start_step: int = 10
    end_step: int = 12
    ranks: List[int] = field(default_factory=lambda: [0])


@dataclass
class PretrainedCheckpoint:
    restore_from_path: Optional[str] = None


def typed(section: Any, schema: Type[T]) -> T:
    """`section` (a DictConfig, resolved against the whole config; a dict; None; or a `schema`) as a
    `schema` instance: unset keys take the dataclass defaults, unknown keys and wrong types raise."""
    from omegaconf import OmegaConf

    if isinstance(section, schema):
        return section
    if section is None:
        return schema()
    if OmegaConf.is_config(section):  # resolve against the whole config first (${cluster.nodes} ...)
        section = OmegaConf.to_container(section, resolve=True)
    if isinstance(section, dict):
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(section)))
    if hasattr(section, "__dataclass_fields__"):  # another dataclass of the same keys
        import dataclasses

        return typed(dataclasses.asdict(section), schema)
    raise TypeError(f"expected {schema.__name__}, a dict or a DictConfig, got {type(section).__name__}")


def select(cfg: Any, key: str, default: Any = None) -> Any:
    """The plain value at a dotted key of a DictConfig, dataclasses or dicts; `default` where absent."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        v = OmegaConf.select(cfg, key, default=default)
        return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
    cur = cfg
    for part in key.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else getattr(cur, part, None)
        if cur is None:
            return default
    return cur


def tokenizer_source(cfg: Any, stage: str) -> tuple:
    """The one tokenizer precedence of every stage: (path, library).

    1. `data.tokenizer.model` (+ `.library`): what the data was tokenized with (prep records it);
    2. `model.tokenizer.model` (+ `.library`): the model's own tokenizer file;
    3. `model.restore_from_path`: the checkpoint's embedded tokenizer (library inferred from the file
       unless `model.tokenizer.library` says).
    """
    for section in ("data.tokenizer", "model.tokenizer"):
        path = select(cfg, f"{section}.model")
        if path:
            return str(path), select(cfg, f"{section}.library")
    path = select(cfg, "model.restore_from_path")
    if path:
        return str(path), select(cfg, "model.tokenizer.library")
    raise ValueError(f"{stage} needs a tokenizer: run the prep stage (it records one in data.tokenizer.model), "
                     "or set data.tokenizer.model or model.tokenizer.model")
