"""PPO stage configuration, shaped like NeMo-Aligner's gpt_ppo_actor.yaml and gpt_ppo_critic.yaml."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from engine.config import (CheckpointCallbackParams, ExpManagerConfig, OptimConfig, PretrainedCheckpoint,
                           SchedConfig, TorchProfileConfig)


@dataclass
class AdaptiveKLConfig:
    """Steer the KL coefficient toward `target` nats per response: after each PPO step
    beta *= exp(clip(log(KL / target), -0.2, 1) / horizon), so `horizon` is the number of PPO steps over
    which the coefficient closes the gap (log-space; at most e^(1/horizon) up per step, e^(-0.2/horizon) down). A unit users think
    in: TRL's and Ziegler et al.'s horizon counts samples, the same as horizon x num_rollout_samples."""
    enable: bool = False
    target: float = 6.0
    horizon: float = 5.0  # PPO steps


@dataclass
class PPOLoopConfig:
    critic_warmup_steps: int = 0
    max_epochs: int = 1
    max_steps: int = -1
    val_check_interval: int = 10
    save_interval: int = 10
    gradient_clip_val: float = 1.0
    initial_policy_kl_penalty: float = 0.01
    use_absolute_kl: bool = True
    adaptive_kl: AdaptiveKLConfig = field(default_factory=AdaptiveKLConfig)
    discount_factor: float = 1.0
    gae_lambda: float = 0.95
    normalize_advantages: bool = True


@dataclass
class PPOTrainerConfig:
    num_nodes: int = 1
    devices: int = 1
    accelerator: str = "auto"
    precision: str = "bf16"
    ppo: PPOLoopConfig = field(default_factory=PPOLoopConfig)


@dataclass
class SamplingParams:
    use_greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    # null = the tokenizer's EOS and end-of-turn tokens and HH's next turn "\n\nUser:" (ppo/rollout.py);
    # `\n` in a string is a newline (from YAML and from the command line alike)
    end_strings: Optional[List[str]] = None


@dataclass
class LengthParams:
    max_length: int = 256
    min_length: int = 1


@dataclass
class ActorPPOConfig:
    rollout_micro_batch_size: int = 8
    num_rollout_samples: int = 512
    forward_micro_batch_size: int = 8
    val_rollout_micro_batch_size: int = 8
    num_val_samples: int = 64  # validation rollouts: the first N validation prompts, fixed sampling seed
    ppo_epochs: int = 1  # passes over each rollout batch
    # reference and reward model parked in CPU memory while actor and critic train (GPU only)
    entropy_bonus: float = 0.0
    ratio_eps: float = 0.2
    offload_idle_models: bool = False
    # TRL's key: a response cut at max_length without an end string loses this much reward (null = none)
    missing_eos_penalty: Optional[float] = None
    # gae: a critic's values (NeMo-Aligner's PPO) | grpo: group-normalized rewards | rloo: leave-one-out
    # baseline; grpo and rloo build no critic (ppo/advantages.py)
    advantage_estimator: str = "gae"
    # responses sampled per prompt (NeMo-Aligner REINFORCE's name): num_rollout_samples counts responses, so a
    # step holds num_rollout_samples / num_rollouts_per_prompt prompts; grpo and rloo need at least 2
    num_rollouts_per_prompt: int = 1
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    length_params: LengthParams = field(default_factory=LengthParams)


@dataclass
class PPODataConfig:
    data_impl: str = "jsonl"
    seq_length: int = 1024
    # {train: [prompts.jsonl], validation: [...], test: [...]}; all empty = the prep stage's prompts.
    data_prefix: Dict[str, Any] = field(default_factory=lambda: {"train": [], "validation": [], "test": []})


@dataclass
class ActorModelConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 64
    seed: int = 1234
    ppo: ActorPPOConfig = field(default_factory=ActorPPOConfig)
    # gpt_ppo_actor.yaml: lr 9e-7 decaying to 9e-8 (the shared default min_lr, 9e-7, would hold it flat)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=9e-7, sched=SchedConfig(min_lr=9e-8)))
    data: PPODataConfig = field(default_factory=PPODataConfig)
    torch_profile: TorchProfileConfig = field(default_factory=lambda: TorchProfileConfig(start_step=3, end_step=3))


@dataclass
class RewardStandardization:
    enable: bool = False
    mean: float = 0.0
    std: float = 1.0


@dataclass
class CriticConfig:
    # null = the reward model (NeMo-Aligner starts the critic from the reward model's .nemo)
    restore_from_path: Optional[str] = None
    micro_batch_size: int = 1
    global_batch_size: int = 64
    loss_clip_val: float = 0.2
    reward_standardization: RewardStandardization = field(default_factory=RewardStandardization)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=9e-6))


@dataclass
class RewardModelRef:
    restore_from_path: Optional[str] = None  # null = the rm stage's .nemo


@dataclass
class PPOConfig:
    trainer: PPOTrainerConfig = field(default_factory=PPOTrainerConfig)
    exp_manager: ExpManagerConfig = field(default_factory=lambda: ExpManagerConfig(
        name="megatron_gpt_ppo_actor",
        # as gpt_ppo_actor.yaml: keep the best by validation reward (plus the newest, for resume)
        checkpoint_callback_params=CheckpointCallbackParams(
            monitor="val_global_rewards", mode="max", save_top_k=1, always_save_nemo=False,
            save_nemo_on_train_end=True, filename="megatron_gpt-{step}-{val_global_rewards:.3f}")))
    pretrained_checkpoint: PretrainedCheckpoint = field(default_factory=PretrainedCheckpoint)
    model: ActorModelConfig = field(default_factory=ActorModelConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    reward_model: RewardModelRef = field(default_factory=RewardModelRef)
