"""The root schema: what `conf/` composes into. Registered in Hydra's ConfigStore as `kit_schema`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from data_prep.config import DataConfig
from dpo.config import DPOConfig
from evaluation.config import EvalConfig
from modeling.config import ModelConfig
from ppo.config import PPOConfig
from rm_training.config import RMConfig
from sft.config import SFTConfig

STAGES = ("prep", "sft", "rm", "dpo", "ppo", "eval")


@dataclass
class ClusterConfig:
    name: str = "local"  # local | slurm
    nodes: int = 1
    gpus_per_node: int = 0  # 0: CPU. Local runs start one process per GPU.
    processes_per_node: Optional[int] = None  # null = max(1, gpus_per_node); >1 on CPU uses gloo
    # Slurm (ignored by cluster=local)
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "04:00:00"
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None  # e.g. 0 (whole node), 200G
    exclusive: bool = False
    constraint: Optional[str] = None
    gpu_option: str = "gpus_per_node"  # gpus_per_node (--gpus-per-node) | gres (--gres=gpu:N)
    container_image: Optional[str] = None  # pyxis --container-image
    container_mounts: List[str] = field(default_factory=list)
    setup: List[str] = field(default_factory=list)  # shell lines run before the stage
    env: Dict[str, str] = field(default_factory=dict)
    sbatch_args: Dict[str, str] = field(default_factory=dict)  # extra sbatch options
    srun_args: List[str] = field(default_factory=list)
    requeue: bool = True  # a signalled stage (time limit near, preemption) checkpoints and is requeued
    signal_delay_s: int = 120  # --signal=USR1@N: warn the stage N seconds before the time limit
    max_requeues: int = 3  # give up after this many requeues of one stage
    python: Optional[str] = None  # the Python command in the job (e.g. `python` in a container); null: this one
    wait: bool = False  # wait for the jobs and stream the log


@dataclass
class RunConfig:
    name: str = "quickstart"
    dir: str = "results/${run.name}"
    stage_dir: Optional[str] = None  # set by the launcher for the stage being run
    # set by the launcher on force=true: this launch's id; a stage then resumes only checkpoints written
    # under it (a Slurm requeue), never an earlier run's (engine/resume.py)
    force_id: Optional[str] = None
    detect_anomaly: bool = False  # torch.autograd anomaly detection in the training stages (debug=fdr)


@dataclass
class LoggerConfig:
    """Where a training stage's metrics go besides its metrics.jsonl and tensorboard/ (always written)."""
    name: str = "tensorboard"  # tensorboard | wandb | mlflow (the logger= group chooses)
    project: str = "rlhf-kit"  # wandb project, mlflow experiment
    run_name: Optional[str] = None  # null: <run.name>-<stage>; one logger run per stage, grouped by run.name
    offline: bool = False  # wandb: mode=offline; mlflow: a local SQLite store (no tracking server)
    save_dir: Optional[str] = None  # null: the run directory (wandb/, mlflow.db in it)
    tracking_uri: Optional[str] = None  # mlflow server (null: SQLite store in save_dir); ignored when offline
    tags: List[str] = field(default_factory=list)


@dataclass
class KitConfig:
    stage: Any = "all"  # prep | rm | ppo | all, or a list in pipeline order: rm,ppo (or [rm,ppo])
    dry_run: bool = False
    force: bool = False  # re-run stages even when their recorded artifacts are up to date
    export_hf: bool = False  # stages that write a .nemo (rm, ppo) also write <stage>/hf/, a transformers folder
    run: RunConfig = field(default_factory=RunConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # what a search sweeper optimises (hparams_search=...): <stage>/<split>/<metric> from that stage's
    # metrics.jsonl, e.g. rm/val/loss, rm/test/accuracy, ppo/val/<metric>; the job returns its last value
    optimized_metric: Optional[str] = None
    # every model preset must say where its weights come from (null = random init), so a preset such
    # as gpt_2b can leave it `???` and have the launcher ask for it
    model: ModelConfig = field(default_factory=lambda: ModelConfig(restore_from_path=MISSING))
    data: DataConfig = field(default_factory=DataConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
