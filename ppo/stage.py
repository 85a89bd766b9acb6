"""`run(cfg)`: the ppo stage from the composed config to its artifacts.

Reads cfg.model (the initial policy), cfg.ppo (NeMo-Aligner's keys), cfg.data.tokenizer (the prep
stage's tokenizer), cfg.ppo.reward_model.restore_from_path (the rm stage's .nemo). Writes, in the
stage folder (`ppo.exp_manager.explicit_log_dir`): metrics.jsonl, tensorboard/, metrics.png,
samples/step_*.jsonl, checkpoints/ (resume state, `index.json`) and the trained actor's .nemo.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from typing import Dict, Optional

import torch

from data_prep.tokenizers import load_tokenizer
from modeling import ModelTokenizerConfig, save_nemo
from modeling.config import engine_switches
from engine import distributed as D
from engine.checkpointing import CheckpointManager, seed_everything
from engine.config import tokenizer_source, typed
from engine.io import fix_mode
from engine.loop import LoopConfig, TrainingLoop, run_length
from engine.precision import compute_dtype
from engine.resume import prepare_checkpoint_dir, stage_identity

from .advantages import check_estimator
from .config import PPOConfig
from .data import PromptDataset
from .models import frozen_copy, mask_padded_vocab, load_actor, load_critic, load_reward, model_config
from .trainer import PPOTrainer

log = logging.getLogger("ppo")
PLOT_KEYS = ("reward_mean", "kl", "kl_per_token", "kl_coef", "cut_at_max_length", "response_length",
             "entropy", "clip_fraction", "value_loss")
STEP_KEYS = ("reward_mean", "kl", "kl_coef", "cut_at_max_length", "entropy", "value_loss", "clip_fraction",
             "response_length", "time_generation", "time_scoring", "time_training")
TIME_KEYS = ("time_generation", "time_scoring", "time_training", "response_length")
# what identifies the ppo stage's training state, and the keys a resumed run may change (more steps,
# other logging): the rule every training stage shares, engine/resume.py
IDENTITY_SECTIONS = ("model", "ppo", "data.tokenizer")
RESUMABLE = ("ppo.exp_manager", "ppo.trainer.ppo.max_steps", "ppo.trainer.ppo.max_epochs",
             "ppo.trainer.ppo.val_check_interval", "ppo.trainer.ppo.save_interval", "ppo.model.torch_profile")


def _ppo_config(cfg) -> PPOConfig:
    return typed(cfg.ppo, PPOConfig)


def _tokenizer(cfg, tmp: str):
    path, library = tokenizer_source(cfg, "ppo")  # engine/config.py: the one precedence
    return load_tokenizer(path, library, extract_dir=tmp)


def _tokenizer_file(tok, tmp: str) -> str:
    """One file to store as the .nemo's tokenizer artifact."""
    path = getattr(tok, "path", None)
    if path and not str(path).endswith(".gguf"):
        return path
    return tok.save(tmp)  # a tokenizer read from a .gguf -> its tokenizer.json


def _splits(prefix: Dict) -> Dict[str, list]:
    out = {k: [str(p) for p in (v or [])] for k, v in (prefix or {}).items()}
    if not out.get("train"):
        raise ValueError("ppo.model.data.data_prefix.train is empty: run the prep stage first or set it to "
                         "[/path/train_prompts.jsonl]")
    out["validation"] = out.get("validation") or out.get("test") or out["train"]
    return out


def run(cfg) -> Dict[str, str]:
    pcfg = _ppo_config(cfg)
    stage_dir = os.path.abspath(pcfg.exp_manager.explicit_log_dir or cfg.run.stage_dir or "results/ppo")
    rcfg, loop = pcfg.model.ppo, pcfg.trainer.ppo
    device = D.select_device(pcfg.trainer.accelerator)
    seed_everything(pcfg.model.seed)
    tmp = tempfile.mkdtemp(prefix="ppo_")
    try:
        return _run(cfg, pcfg, stage_dir, rcfg, loop, device, tmp)
    except torch.OutOfMemoryError as e:
        raise torch.OutOfMemoryError(
            f"{e}\nppo: the four models did not fit this GPU. GPT-2B on one 80 GB GPU needs "
            "ppo.model.ppo.offload_idle_models=true and micro-batches of at most 4 (actor) / 8 (critic, scoring); "
            "next: model.activations_checkpointing=true, smaller ppo.model.micro_batch_size, "
            "ppo.critic.micro_batch_size, ppo.model.ppo.forward_micro_batch_size or rollout_micro_batch_size "
            "(see benchmarks/ppo_README.md)") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(cfg, pcfg, stage_dir, rcfg, loop, device, tmp):
    tok = _tokenizer(cfg, tmp)
    mcfg = model_config(cfg.model)
    if pcfg.pretrained_checkpoint.restore_from_path:  # NeMo-Aligner's own key for the initial policy
        mcfg.restore_from_path = str(pcfg.pretrained_checkpoint.restore_from_path)
    dtype = compute_dtype(mcfg.precision, device, "model.precision")
    rm_path = pcfg.reward_model.restore_from_path
    if not rm_path:
        raise ValueError("ppo.reward_model.restore_from_path is not set: run the rm stage first (stage=rm,ppo)")
    t0 = time.perf_counter()
    actor = load_actor(mcfg, tok.vocab_size, device, dtype, pcfg.model.seed)
    reference = frozen_copy(actor)
    for m in (actor, reference):
        mask_padded_vocab(m, tok.vocab_size)
    # the engine switches (model.torch_compile, activations_checkpointing, activation_memory_budget)
    # apply to all four models (generation keeps its eager blocks and CUDA graphs either way)
    reward = load_reward(str(rm_path), device, dtype, torch_compile=mcfg.torch_compile)
    estimator = rcfg.advantage_estimator
    check_estimator(estimator, rcfg.num_rollouts_per_prompt, rcfg.num_rollout_samples, D.world_size())
    # grpo / rloo: the baseline is the other responses to the prompt; no critic is loaded at all
    critic = load_critic(str(pcfg.critic.restore_from_path or rm_path), device, dtype, **engine_switches(mcfg)) \
        if estimator == "gae" else None
    log.info("models on %s in %s: actor %.1fM params, %s, reward %.1fM, reference frozen copy (%.1fs)",
             device, str(dtype).replace("torch.", ""), _m(actor),
             f"critic {_m(critic):.1f}M" if critic is not None else
             f"no critic ({estimator}, {rcfg.num_rollouts_per_prompt} responses per prompt)", _m(reward),
             time.perf_counter() - t0)

    if rcfg.sampling_params.repetition_penalty != 1.0:
        raise ValueError("ppo.model.ppo.sampling_params.repetition_penalty: only 1.0 is supported by the generator "
                         "(NeMo-Aligner's PPO default)")
    splits = _splits(pcfg.model.data.data_prefix)
    max_prompt = pcfg.model.data.seq_length - rcfg.length_params.max_length
    if max_prompt < 1:
        raise ValueError(f"ppo.model.data.seq_length={pcfg.model.data.seq_length} leaves no room for prompts after "
                         f"length_params.max_length={rcfg.length_params.max_length}")
    train = PromptDataset(splits["train"], tok, max_prompt, seed=pcfg.model.seed)
    val = PromptDataset(splits["validation"], tok, max_prompt, shuffle=False)
    n = rcfg.num_rollout_samples
    max_steps = run_length(loop.max_steps, loop.max_epochs, math.ceil(len(train) * rcfg.num_rollouts_per_prompt / n),
                           "ppo.trainer.ppo", log)
    log.info("%d train prompts, %d validation prompts; %d steps of %d rollouts", len(train), len(val), max_steps, n)
    _check_schedules(pcfg, max_steps)

    trainer = PPOTrainer(pcfg, actor=actor, reference=reference, reward=reward, critic=critic, tokenizer=tok,
                         train_data=train, val_data=val, device=device, max_steps=max_steps, stage_dir=stage_dir,
                         offload_idle_models=rcfg.offload_idle_models)
    ckpt_params = pcfg.exp_manager.checkpoint_callback_params
    ckpt_dir = os.path.join(stage_dir, "checkpoints")
    identity = stage_identity(cfg, IDENTITY_SECTIONS, RESUMABLE)
    if D.is_main():  # checkpoints of another config (or force=true) are moved aside, never resumed
        prepare_checkpoint_dir(ckpt_dir, identity, pcfg.exp_manager.resume_if_exists, "ppo")
    D.barrier()
    manager = CheckpointManager(ckpt_dir, monitor=ckpt_params.monitor, mode=ckpt_params.mode,
                                save_top_k=ckpt_params.save_top_k, filename=ckpt_params.filename)
    samples_dir = os.path.join(stage_dir, "samples")
    task = PPOTask(trainer, samples_dir, max_steps)
    engine_loop = TrainingLoop(task, LoopConfig(
        max_steps=max_steps, val_check_interval=loop.val_check_interval, save_interval=loop.save_interval,
        validate_at_start=True, has_validation=loop.val_check_interval > 0, resume=pcfg.exp_manager.resume_if_exists,
        monitor=ckpt_params.monitor, torch_profile=pcfg.model.torch_profile, progress_unit="rollouts"),
        stage_dir=stage_dir, name="ppo", checkpoints=manager, identity=identity, device=device)
    task.loop = engine_loop
    engine_loop.run()
    logger = engine_loop.logger
    # every rank must hold the same policy (same init, averaged gradients): say so in each rank's log
    checksum = sum(float(p.detach().double().sum()) for p in actor.parameters())
    log.info("rank %d actor checksum %.12e", D.rank(), checksum)
    artifacts = {"metrics": logger.path}
    if D.is_main():
        nemo_path = os.path.join(stage_dir, f"{pcfg.exp_manager.name}.nemo")
        actor.config.tokenizer = ModelTokenizerConfig(library=tok.library, model=None)
        save_nemo(actor, nemo_path, tokenizer_path=_tokenizer_file(tok, tmp))
        fix_mode(nemo_path)  # modeling writes through mkstemp (0600): the umask's mode, as every output
        log.info("trained actor: %s", nemo_path)
        artifacts["nemo"] = nemo_path
        artifacts["plot"] = logger.plot(PLOT_KEYS, title="PPO")
        artifacts["timing_plot"] = logger.plot(TIME_KEYS, splits=("train",), title="PPO step time (s)",
                                               path=os.path.join(stage_dir, "timing.png"))
        if os.path.isdir(samples_dir):
            artifacts["samples"] = samples_dir
        artifacts["checkpoints"] = ckpt_dir
    logger.close()
    D.barrier()
    return artifacts


def _check_schedules(pcfg: PPOConfig, max_steps: int) -> None:
    """The launcher's schedule rule again, with the real run length (as PPOTrainer counts optimizer steps)."""
    from engine.schedule import check_run

    r, warm = pcfg.model.ppo, pcfg.trainer.ppo.critic_warmup_steps
    trained = (("ppo.model.optim", pcfg.model, warm), ("ppo.critic.optim", pcfg.critic, 0))
    if r.advantage_estimator != "gae":  # no critic; the actor trains from step 1
        trained = (("ppo.model.optim", pcfg.model, 0),)
    for key, section, skip in trained:
        per = max(1, r.num_rollout_samples // section.global_batch_size)
        check_run(key, section.optim, max(1, max_steps - skip) * r.ppo_epochs * per,
                  f"{max_steps} PPO steps x ppo_epochs {r.ppo_epochs} x {per} optimizer steps of "
                  f"{section.global_batch_size} rollouts", log)


class PPOTask:
    """PPOTrainer as a task of engine's loop (engine/loop.py): one PPO step per optimizer step of the loop."""

    def __init__(self, trainer: PPOTrainer, samples_dir: str, max_steps: int):
        self.trainer, self.samples_dir, self.max_steps = trainer, samples_dir, max_steps
        self.loop: Optional[TrainingLoop] = None

    def train_step(self, step: int) -> Dict[str, float]:
        m = self.trainer.train_step()  # its own step counter: PPO's data cursor (trainer.step == step + 1 after)
        log.info("step %d/%d  %s", self.trainer.step, self.max_steps, _fmt(m, STEP_KEYS))
        return m

    def validate(self, should_stop=None) -> Optional[Dict[str, float]]:
        """One batch of validation rollouts (not cut once started: a single generation call)."""
        if should_stop is not None and should_stop():
            return None
        return self.trainer.validate(self.samples_dir)

    def on_validated(self, step: int, metrics: Dict[str, float], end: bool) -> None:
        if D.is_main() and not end:  # curves on disk while it runs (the end is plotted by the stage)
            self.loop.logger.plot(PLOT_KEYS, title="PPO")

    def progress(self, m: Dict[str, float]):
        return self.trainer.rcfg.num_rollout_samples, 0, {"reward": m.get("reward_mean", float("nan"))}

    def state_dict(self) -> dict:
        return self.trainer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.trainer.load_state_dict(state)


def _m(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def _fmt(m: Dict[str, float], keys: Optional[tuple] = None) -> str:
    keys = keys or tuple(m)
    return "  ".join(f"{k} {m[k]:.4g}" for k in keys if isinstance(m.get(k), (int, float)))
