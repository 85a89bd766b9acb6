"""`run(cfg)`: the sft stage from the composed config to its artifacts.

Reads cfg.model (the base model: `sft.model.restore_from_path`, random init of the architecture keys
when null), cfg.sft (gpt_sft.yaml's keys), cfg.data.tokenizer (the prep stage's tokenizer) and the
data (`sft.model.data.{train_ds,validation_ds}.file_path`, else prep's comparison JSONL through
`sft.model.data.data_prefix`). Writes, in the stage folder: metrics.jsonl, tensorboard/, metrics.png,
data_report.json, checkpoints/ and `<exp_manager.name>.nemo` (the fine-tuned policy: dpo's and ppo's
starting point through the manifest).
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Dict, Optional

import torch

from engine import distributed as D
from engine.checkpointing import CheckpointManager, seed_everything
from engine.config import select, tokenizer_source, typed
from engine.io import write_json
from engine.loop import LoopConfig, TrainingLoop, finish_policy_stage, run_length
from engine.precision import compute_dtype
from engine.resume import prepare_checkpoint_dir, stage_identity

from .config import SFTConfig, SFTDatasetConfig
from .data import SFTDataset, build_dataset, global_batches, hh_records, template_records
from .trainer import SFTSettings, SFTTask

log = logging.getLogger("sft")
IDENTITY_SECTIONS = ("model", "sft", "data.tokenizer")
RESUMABLE = ("sft.exp_manager", "sft.trainer.sft.max_steps", "sft.trainer.sft.max_epochs",
             "sft.trainer.sft.val_check_interval", "sft.trainer.sft.save_interval",
             "sft.trainer.sft.limit_val_batches", "sft.model.torch_profile")
PLOT_KEYS = ("loss", "perplexity")


def load_policy(model_cfg, restore_from_path: Optional[str], vocab_size: int, seed: int):
    """The base model with its LM head, in fp32 (autocast computes in bf16 on a GPU)."""
    import dataclasses

    from modeling import build_model, load_pretrained
    from modeling.config import engine_switches

    if restore_from_path:
        model = load_pretrained(str(restore_from_path), dtype=torch.float32, **engine_switches(model_cfg))
    else:
        torch.manual_seed(seed)
        model = build_model(dataclasses.replace(model_cfg, restore_from_path=None), vocab_size=vocab_size)
    if model.vocab_size < vocab_size:
        raise ValueError(f"the model's vocab ({model.vocab_size}) is smaller than the tokenizer's ({vocab_size})")
    return model


def tokenizer_and_file(cfg, stage: str, stage_dir: str):
    """The tokenizer (engine's precedence) and one file to embed in the .nemo."""
    from data_prep.tokenizers import load_tokenizer

    path, library = tokenizer_source(cfg, stage)
    tok = load_tokenizer(path, library, extract_dir=os.path.join(stage_dir, "tokenizer"))
    tok_file = getattr(tok, "path", None)
    if tok.library == "huggingface" and not str(tok_file).endswith(".json"):
        os.makedirs(os.path.join(stage_dir, "tokenizer"), exist_ok=True)
        tok_file = tok.save(os.path.join(stage_dir, "tokenizer")) if D.is_main() else None
        tok_file = D.broadcast_object(tok_file)
    return tok, tok_file


def _split_data(sft: SFTConfig, tok, split: str, ds_cfg: SFTDatasetConfig) -> Optional[SFTDataset]:
    prefixes = sft.model.data.data_prefix or {}
    if ds_cfg.file_path:
        skipped: Counter = Counter()
        where: Dict = {}
        records = template_records(str(ds_cfg.file_path), ds_cfg.prompt_template, ds_cfg.label_key, skipped, where)
        origin = str(ds_cfg.file_path)
    else:
        paths = prefixes.get(split) or (prefixes.get("test") if split == "validation" else None) or []
        if not paths:
            return None
        records, skipped, where = [r for p in paths for r in hh_records(str(p))], Counter(), {}
        origin = ", ".join(str(p) for p in paths)
    ds = build_dataset(tok, records, ds_cfg.max_seq_length, ds_cfg.min_seq_length, ds_cfg.truncation_method,
                       sft.model.answer_only_loss, ds_cfg.add_bos, ds_cfg.add_eos, split)
    if skipped:
        ds.stats["skipped"] = dict(Counter(ds.stats["skipped"]) + skipped)
        ds.stats["skipped_where"].update({k: v[:10] for k, v in where.items()})
        log.warning("%s: skipped %s (lines %s)", origin, dict(skipped), {k: v[:10] for k, v in where.items()})
    ds.stats["source"] = origin
    return ds


def run(cfg) -> Dict[str, str]:
    from modeling import ModelTokenizerConfig, save_nemo
    from modeling.config import ModelConfig

    sft: SFTConfig = typed(cfg.sft, SFTConfig)
    model_cfg: ModelConfig = typed(cfg.model, ModelConfig)
    stage_dir = os.path.abspath(sft.exp_manager.explicit_log_dir or select(cfg, "run.stage_dir") or "results/sft")
    if D.is_main():
        os.makedirs(stage_dir, exist_ok=True)
    D.barrier()
    device = D.select_device(sft.trainer.accelerator)
    seed_everything(sft.model.seed)
    tok, tok_file = tokenizer_and_file(cfg, "sft", stage_dir)
    pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id
    data = sft.model.data
    train = _split_data(sft, tok, "train", data.train_ds)
    if train is None or not len(train):
        raise ValueError("sft.model.data.data_prefix.train is empty and sft.model.data.train_ds.file_path is not set: "
                         "run the prep stage (stage=prep,sft) or set one")
    val = _split_data(sft, tok, "validation", data.validation_ds)
    t, tds = sft.trainer.sft, data.train_ds
    dp = D.world_size()
    if tds.global_batch_size % (tds.micro_batch_size * dp) and not tds.packed_sequence:
        raise ValueError(f"sft.model.data.train_ds.global_batch_size={tds.global_batch_size} is not divisible by "
                         f"micro_batch_size={tds.micro_batch_size} x {dp} data-parallel ranks")
    per_epoch = len(global_batches(len(train), tds.global_batch_size, 0, 0, False, tds.drop_last))
    if per_epoch == 0:
        raise ValueError(f"{len(train)} training samples do not fill one global batch of {tds.global_batch_size}")
    max_steps = run_length(t.max_steps, t.max_epochs, per_epoch, "sft.trainer.sft", log)
    from engine.schedule import check_run

    check_run("sft.model.optim", sft.model.optim, max_steps, f"{len(train)} samples / global_batch_size "
              f"{tds.global_batch_size} x max_epochs {t.max_epochs}, max_steps {t.max_steps}", log)

    restore = sft.model.restore_from_path or model_cfg.restore_from_path
    model = load_policy(model_cfg, restore, tok.vocab_size, sft.model.seed)
    model.config.tokenizer = ModelTokenizerConfig(library=tok.library, model=None)
    dtype = compute_dtype(sft.trainer.precision, device, "sft.trainer.precision")
    vds = data.validation_ds
    settings = SFTSettings(
        global_batch_size=tds.global_batch_size, micro_batch_size=tds.micro_batch_size, max_steps=max_steps,
        seed=sft.model.seed, shuffle=tds.shuffle, drop_last=tds.drop_last, packed_sequence=tds.packed_sequence,
        packed_tokens=tds.packed_tokens, val_global_batch_size=vds.global_batch_size,
        val_micro_batch_size=vds.micro_batch_size, val_packed_sequence=vds.packed_sequence,
        val_packed_tokens=vds.packed_tokens, limit_val_batches=t.limit_val_batches,
        gradient_clip_val=t.gradient_clip_val, autocast_dtype=dtype if dtype != torch.float32 else None)
    task = SFTTask(model, sft.model.optim, settings, train, val, pad_id, device)
    log.info("sft: %s, %.1fM parameters, from %s; %d train samples (%d target tokens), %d validation; %d steps "
             "(%d per epoch) of %d samples%s on %s", model.config.name, model.num_parameters() / 1e6,
             restore or "random init", len(train), int(train.targets.sum()), len(val) if val else 0, max_steps,
             per_epoch, tds.global_batch_size, ", packed" if tds.packed_sequence else "", device)

    ckpt_params = sft.exp_manager.checkpoint_callback_params
    ckpt_dir = os.path.join(stage_dir, "checkpoints")
    identity = stage_identity(cfg, IDENTITY_SECTIONS, RESUMABLE)
    if D.is_main():
        prepare_checkpoint_dir(ckpt_dir, identity, sft.exp_manager.resume_if_exists, "sft")
    D.barrier()
    manager = CheckpointManager(ckpt_dir, ckpt_params.monitor, ckpt_params.mode, ckpt_params.save_top_k,
                                ckpt_params.filename)
    if D.is_main():
        write_json(os.path.join(stage_dir, "data_report.json"), {
            "train": train.stats, "validation": val.stats if val else None,
            "batching": {"steps_per_epoch": per_epoch, "max_steps": max_steps, "data_parallel": dp,
                         "global_batch_size": tds.global_batch_size, "micro_batch_size": tds.micro_batch_size,
                         "packed_sequence": tds.packed_sequence, "packed_tokens": tds.packed_tokens}})
    loop = TrainingLoop(task, LoopConfig(
        max_steps=max_steps, val_check_interval=t.val_check_interval, save_interval=t.save_interval,
        has_validation=val is not None and len(val) > 0, resume=sft.exp_manager.resume_if_exists,
        monitor=ckpt_params.monitor, torch_profile=sft.model.torch_profile, progress_unit="samples"),
        stage_dir=stage_dir, name="sft", checkpoints=manager, identity=identity, device=device)
    loop.run()

    return finish_policy_stage(loop, lambda path: save_nemo(task.model, path, tokenizer_path=tok_file), stage_dir,
                               sft.exp_manager.name, ckpt_dir, PLOT_KEYS,
                               f"SFT ({model.config.name})", "fine-tuned policy")
