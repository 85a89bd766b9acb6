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
from omegaconf import OmegaConf

from data_prep.tokenizers import load_tokenizer
from modeling import ModelTokenizerConfig, save_nemo
from modeling.config import engine_switches
from rm_training import distributed as D
from rm_training.checkpointing import CheckpointManager, PreemptionHandler, load_state, seed_everything
from rm_training.profiling import StepProfiler
from rm_training.resume import digest as config_digest, prepare_checkpoint_dir, stage_identity
from rm_training.trainer import every
from rm_training.metrics import MetricsLogger

from .config import PPOConfig
from .data import PromptDataset
from .models import compute_dtype, frozen_copy, mask_padded_vocab, load_actor, load_critic, load_reward, model_config
from .trainer import PPOTrainer

log = logging.getLogger("ppo")
PLOT_KEYS = ("reward_mean", "kl", "kl_per_token", "kl_coef", "cut_at_max_length", "response_length",
             "entropy", "clip_fraction", "value_loss")
TIME_KEYS = ("time_generation", "time_scoring", "time_training", "response_length")
# what identifies the ppo stage's training state, and the keys a resumed run may change (more steps,
# other logging): the rule every training stage shares, rm_training/resume.py
IDENTITY_SECTIONS = ("model", "ppo", "data.tokenizer")
RESUMABLE = ("ppo.exp_manager", "ppo.trainer.ppo.max_steps", "ppo.trainer.ppo.max_epochs",
             "ppo.trainer.ppo.val_check_interval", "ppo.trainer.ppo.save_interval", "ppo.model.torch_profile")


def _ppo_config(cfg) -> PPOConfig:
    obj = OmegaConf.to_object(cfg.ppo) if OmegaConf.is_config(cfg.ppo) else cfg.ppo
    return obj if isinstance(obj, PPOConfig) else OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PPOConfig), obj))


def _tokenizer(cfg, tmp: str):
    t, m = cfg.data.tokenizer, cfg.model.tokenizer
    for path, lib in ((t.model, t.library), (m.model, m.library)):
        if path:
            return load_tokenizer(str(path), lib, extract_dir=tmp)
    if cfg.model.restore_from_path:
        return load_tokenizer(str(cfg.model.restore_from_path), "nemo", extract_dir=tmp)
    raise ValueError("no tokenizer: set data.tokenizer.model (the prep stage's artifact) or model.tokenizer.model")


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
    dtype = compute_dtype(mcfg.precision, device)
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
    critic = load_critic(str(pcfg.critic.restore_from_path or rm_path), device, dtype, **engine_switches(mcfg))
    log.info("models on %s in %s: actor %.1fM params, critic %.1fM, reward %.1fM, reference frozen copy (%.1fs)",
             device, str(dtype).replace("torch.", ""), _m(actor), _m(critic), _m(reward), time.perf_counter() - t0)

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
    max_steps = loop.max_steps if loop.max_steps and loop.max_steps > 0 else \
        loop.max_epochs * math.ceil(len(train) / n)
    log.info("%d train prompts, %d validation prompts; %d steps of %d rollouts", len(train), len(val), max_steps, n)
    _check_schedules(pcfg, max_steps)

    trainer = PPOTrainer(pcfg, actor=actor, reference=reference, reward=reward, critic=critic, tokenizer=tok,
                         train_data=train, val_data=val, device=device, max_steps=max_steps, stage_dir=stage_dir,
                         offload_idle_models=rcfg.offload_idle_models)
    ckpt_params = pcfg.exp_manager.checkpoint_callback_params
    ckpt_dir = os.path.join(stage_dir, "checkpoints")
    identity = stage_identity(cfg, IDENTITY_SECTIONS, RESUMABLE)
    digest = config_digest(identity)
    if D.is_main():  # checkpoints of another config (or force=true) are moved aside, never resumed
        prepare_checkpoint_dir(ckpt_dir, identity, pcfg.exp_manager.resume_if_exists, "ppo")
    D.barrier()
    resumed = _maybe_resume(trainer, ckpt_dir)
    manager = CheckpointManager(ckpt_dir, monitor=ckpt_params.monitor, mode=ckpt_params.mode,
                                save_top_k=ckpt_params.save_top_k, filename=ckpt_params.filename) if D.is_main() else None
    logger = MetricsLogger(stage_dir, resume_step=trainer.step if resumed else None)
    samples_dir = os.path.join(stage_dir, "samples")
    last_val: Dict[str, float] = {}

    def save(step_metrics):
        state = dict(trainer.state_dict(), config_digest=digest)
        if manager is not None:
            path = manager.save(state, trainer.step, step_metrics)
            log.info("checkpoint: %s", path)
        D.barrier()

    if not resumed and loop.val_check_interval > 0:
        last_val = trainer.validate(samples_dir)
        logger.log(0, last_val, split="val")
        log.info("step 0 validation: %s", _fmt(last_val))
    prof = StepProfiler(pcfg.model.torch_profile, stage_dir, D.rank())
    with PreemptionHandler() as preempt:
        while trainer.step < max_steps:
            prof.before(trainer.step + 1)
            m = trainer.train_step()
            step = trainer.step
            prof.after(step)
            logger.log(step, m, split="train")
            log.info("step %d/%d  %s", step, max_steps, _fmt(m, ("reward_mean", "kl", "kl_coef", "cut_at_max_length",
                                                                 "entropy", "value_loss",
                                                                 "clip_fraction", "response_length", "time_generation",
                                                                 "time_scoring", "time_training")))
            if loop.val_check_interval > 0 and (every(step, loop.val_check_interval) or step == max_steps):
                last_val = trainer.validate(samples_dir)
                logger.log(step, last_val, split="val")
                log.info("step %d validation: %s", step, _fmt(last_val))
                if D.is_main() and step < max_steps:  # curves on disk while it runs (the end is plotted below)
                    logger.plot(PLOT_KEYS, title="PPO")
            stop = D.all_reduce_max(float(preempt.requested or 0)) > 0
            if stop or step == max_steps or every(step, loop.save_interval):
                save(dict(m, **last_val))
            if stop and step < max_steps:
                logger.close()
                log.warning("preempted: checkpointed at step %d, exiting with 75 (run again to resume)", step)
                raise SystemExit(PreemptionHandler.EXIT_CODE)
    prof.close()
    logger.flush()
    # every rank must hold the same policy (same init, averaged gradients): say so in each rank's log
    checksum = sum(float(p.detach().double().sum()) for p in actor.parameters())
    log.info("rank %d actor checksum %.12e", D.rank(), checksum)
    artifacts = {"metrics": logger.path}
    if D.is_main():
        nemo_path = os.path.join(stage_dir, f"{pcfg.exp_manager.name}.nemo")
        actor.config.tokenizer = ModelTokenizerConfig(library=tok.library, model=None)
        save_nemo(actor, nemo_path, tokenizer_path=_tokenizer_file(tok, tmp))
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
    for key, section, skip in (("ppo.model.optim", pcfg.model, warm), ("ppo.critic.optim", pcfg.critic, 0)):
        per = max(1, r.num_rollout_samples // section.global_batch_size)
        check_run(key, section.optim, max(1, max_steps - skip) * r.ppo_epochs * per,
                  f"{max_steps} PPO steps x ppo_epochs {r.ppo_epochs} x {per} optimizer steps of "
                  f"{section.global_batch_size} rollouts", log)


def _maybe_resume(trainer: PPOTrainer, ckpt_dir: str) -> bool:
    """The newest checkpoint of ckpt_dir, which prepare_checkpoint_dir left only when this config wrote it."""
    latest = CheckpointManager(ckpt_dir).latest()
    if latest is None:
        return False
    state = load_state(latest, map_location="cpu", restore_rng=False)
    trainer.load_state_dict(state)
    from rm_training.checkpointing import set_rng_state

    set_rng_state(state["rng"])
    log.info("resumed from %s at step %d", latest, trainer.step)
    return True


def _m(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def _fmt(m: Dict[str, float], keys: Optional[tuple] = None) -> str:
    keys = keys or tuple(m)
    return "  ".join(f"{k} {m[k]:.4g}" for k in keys if isinstance(m.get(k), (int, float)))
