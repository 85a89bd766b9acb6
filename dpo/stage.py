"""`run(cfg)`: the dpo stage from the composed config to its artifacts.

The initial policy, which is also the frozen reference: `dpo.pretrained_checkpoint.restore_from_path`
(the launcher fills it with the sft stage's .nemo when the run has one), else `model.restore_from_path`,
else a random init of the model keys (the tiny quickstart). Data: `dpo.model.data.data_prefix`
(prep's comparison JSONL by default). Writes, in the stage folder: metrics.jsonl (loss, accuracy,
implicit rewards and margin), tensorboard/, metrics.png, data_report.json, checkpoints/ and
`<exp_manager.name>.nemo` (the trained policy).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
from typing import Dict, Optional

import torch

from engine import distributed as D
from engine.checkpointing import CheckpointManager, seed_everything
from engine.config import select, tokenizer_source, typed
from engine.io import write_json
from engine.loop import LoopConfig, TrainingLoop, finish_policy_stage, run_length
from engine.precision import compute_dtype
from engine.resume import prepare_checkpoint_dir, stage_identity

from .config import DPOConfig
from .data import PairSet, load_pairs
from .loss import PREFERENCE_LOSSES
from .trainer import DPOSettings, DPOTask

log = logging.getLogger("dpo")
IDENTITY_SECTIONS = ("model", "dpo", "data.tokenizer")
RESUMABLE = ("dpo.exp_manager", "dpo.trainer.dpo.max_steps", "dpo.trainer.dpo.max_epochs",
             "dpo.trainer.dpo.val_check_interval", "dpo.trainer.dpo.save_interval",
             "dpo.trainer.dpo.limit_val_batches", "dpo.model.torch_profile")
PLOT_KEYS = ("loss", "accuracy", "margin", "implicit_reward_chosen", "implicit_reward_rejected")


def _policy(model_cfg, restore: Optional[str], vocab_size: int, seed: int):
    from modeling import build_model, load_pretrained
    from modeling.config import engine_switches

    if restore:
        model = load_pretrained(str(restore), dtype=torch.float32, **engine_switches(model_cfg))
    else:
        torch.manual_seed(seed)
        model = build_model(dataclasses.replace(model_cfg, restore_from_path=None), vocab_size=vocab_size)
    if model.vocab_size < vocab_size:
        raise ValueError(f"the model's vocab ({model.vocab_size}) is smaller than the tokenizer's ({vocab_size})")
    return model


def _tokenizer(cfg, stage_dir: str):
    from data_prep.tokenizers import load_tokenizer

    path, library = tokenizer_source(cfg, "dpo")
    tok = load_tokenizer(path, library, extract_dir=os.path.join(stage_dir, "tokenizer"))
    tok_file = getattr(tok, "path", None)
    if tok.library == "huggingface" and not str(tok_file).endswith(".json"):
        os.makedirs(os.path.join(stage_dir, "tokenizer"), exist_ok=True)
        tok_file = tok.save(os.path.join(stage_dir, "tokenizer")) if D.is_main() else None
        tok_file = D.broadcast_object(tok_file)
    return tok, tok_file


def check(dpo: DPOConfig) -> None:
    """What the config alone can refuse (the launcher's dry run reaches it through the schema's types)."""
    d = dpo.model.dpo
    if d.preference_loss not in PREFERENCE_LOSSES:
        raise ValueError(f"dpo.model.dpo.preference_loss={d.preference_loss!r}: expected one of "
                         f"{' | '.join(PREFERENCE_LOSSES)}")
    if d.ref_policy_kl_penalty <= 0:
        raise ValueError(f"dpo.model.dpo.ref_policy_kl_penalty={d.ref_policy_kl_penalty}: beta must be > 0")
    if d.preference_loss_weight == 0 and d.sft_loss_weight == 0:
        raise ValueError("dpo.model.dpo.preference_loss_weight and sft_loss_weight are both 0: nothing to train")


def run(cfg) -> Dict[str, str]:
    from modeling import ModelTokenizerConfig, save_nemo
    from modeling.config import ModelConfig

    dpo: DPOConfig = typed(cfg.dpo, DPOConfig)
    check(dpo)
    model_cfg: ModelConfig = typed(cfg.model, ModelConfig)
    stage_dir = os.path.abspath(dpo.exp_manager.explicit_log_dir or select(cfg, "run.stage_dir") or "results/dpo")
    if D.is_main():
        os.makedirs(stage_dir, exist_ok=True)
    D.barrier()
    device = D.select_device(dpo.trainer.accelerator)
    m, d, t = dpo.model, dpo.model.dpo, dpo.trainer.dpo
    seed_everything(m.seed)
    tok, tok_file = _tokenizer(cfg, stage_dir)
    pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id
    prefixes = m.data.data_prefix or {}

    def split(name: str) -> Optional[PairSet]:
        paths = prefixes.get(name) or (prefixes.get("test") if name == "validation" else None) or []
        return load_pairs(tok, [str(p) for p in paths], m.data.seq_length, name) if paths else None
    train, val = split("train"), split("validation")
    if train is None or not len(train):
        raise ValueError("dpo.model.data.data_prefix.train is empty: run the prep stage (stage=prep,dpo) or set it")
    dp = D.world_size()
    if m.global_batch_size % (m.micro_batch_size * dp) and not m.data.packing:
        raise ValueError(f"dpo.model.global_batch_size={m.global_batch_size} is not divisible by "
                         f"micro_batch_size={m.micro_batch_size} x {dp} data-parallel ranks")
    per_epoch = len(train) // m.global_batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(train)} training pairs do not fill one global batch of {m.global_batch_size}")
    max_steps = run_length(t.max_steps, t.max_epochs, per_epoch, "dpo.trainer.dpo", log)
    from engine.schedule import check_run

    check_run("dpo.model.optim", m.optim, max_steps, f"{len(train)} pairs / global_batch_size {m.global_batch_size} "
              f"x max_epochs {t.max_epochs}, max_steps {t.max_steps}", log)

    restore = dpo.pretrained_checkpoint.restore_from_path or model_cfg.restore_from_path
    policy = _policy(model_cfg, restore, tok.vocab_size, m.seed)
    policy.config.tokenizer = ModelTokenizerConfig(library=tok.library, model=None)
    reference = None if d.reference_free else copy.deepcopy(policy)
    dtype = compute_dtype(dpo.trainer.precision, device, "dpo.trainer.precision")
    settings = DPOSettings(
        global_batch_size=m.global_batch_size, micro_batch_size=m.micro_batch_size, max_steps=max_steps,
        beta=d.ref_policy_kl_penalty, preference_loss=d.preference_loss,
        preference_average_log_probs=d.preference_average_log_probs,
        sft_average_log_probs=d.preference_average_log_probs if d.sft_average_log_probs is None else d.sft_average_log_probs,
        preference_loss_weight=d.preference_loss_weight, sft_loss_weight=d.sft_loss_weight,
        gt_reward_scale=d.gt_reward_scale, default_chosen_reward=m.data.default_chosen_reward,
        default_rejected_reward=m.data.default_rejected_reward, seed=m.seed, packing=m.data.packing,
        packed_tokens=m.data.packed_tokens, pad_to_multiple=m.data.pad_to_multiple,
        limit_val_batches=t.limit_val_batches, gradient_clip_val=t.gradient_clip_val,
        autocast_dtype=dtype if dtype != torch.float32 else None)
    task = DPOTask(policy, reference, m.optim, settings, train, val, pad_id, device)
    log.info("dpo (%s, beta %g%s): %s, %.1fM parameters, from %s; %d train pairs, %d validation; %d steps (%d per "
             "epoch) of %d pairs%s on %s", d.preference_loss, d.ref_policy_kl_penalty,
             ", reference-free" if d.reference_free else "", policy.config.name, policy.num_parameters() / 1e6,
             restore or "random init", len(train), len(val) if val else 0, max_steps, per_epoch, m.global_batch_size,
             ", packed" if m.data.packing else "", device)

    ckpt_params = dpo.exp_manager.checkpoint_callback_params
    ckpt_dir = os.path.join(stage_dir, "checkpoints")
    identity = stage_identity(cfg, IDENTITY_SECTIONS, RESUMABLE)
    if D.is_main():
        prepare_checkpoint_dir(ckpt_dir, identity, dpo.exp_manager.resume_if_exists, "dpo")
    D.barrier()
    manager = CheckpointManager(ckpt_dir, ckpt_params.monitor, ckpt_params.mode, ckpt_params.save_top_k,
                                ckpt_params.filename)
    if D.is_main():
        write_json(os.path.join(stage_dir, "data_report.json"), {
            "train": train.stats, "validation": val.stats if val else None,
            "batching": {"steps_per_epoch": per_epoch, "max_steps": max_steps, "data_parallel": dp,
                         "global_batch_size": m.global_batch_size, "micro_batch_size": m.micro_batch_size,
                         "packing": m.data.packing, "packed_tokens": m.data.packed_tokens}})
    loop = TrainingLoop(task, LoopConfig(
        max_steps=max_steps, val_check_interval=t.val_check_interval, save_interval=t.save_interval,
        has_validation=val is not None and len(val) > 0, validate_at_start=True,  # the reference: loss ln 2
        resume=dpo.exp_manager.resume_if_exists,
        monitor=ckpt_params.monitor, torch_profile=m.torch_profile, progress_unit="pairs"),
        stage_dir=stage_dir, name="dpo", checkpoints=manager, identity=identity, device=device)
    loop.run()

    return finish_policy_stage(loop, lambda path: save_nemo(task.model, path, tokenizer_path=tok_file), stage_dir,
                               dpo.exp_manager.name, ckpt_dir, PLOT_KEYS,
                               f"DPO ({policy.config.name})", "trained policy")
