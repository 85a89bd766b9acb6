"""The rm stage: config -> tokenizer, reward model, pair datasets -> RMTrainer -> test metrics, plot,
`.nemo` export; returns the artifacts the launcher records (and hands `nemo` to PPO)."""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

import torch

from engine import distributed as D
from engine.checkpointing import seed_everything
from engine.config import select as _select, tokenizer_source, typed as _typed
from engine.io import fix_mode, write_json
from engine.precision import compute_dtype
from engine.resume import prepare_checkpoint_dir, stage_identity

from .config import RMConfig
from .data import PairDataset
from .trainer import LoopSettings, RMTrainer

log = logging.getLogger(__name__)
# what identifies the rm stage's training state, and the keys a resumed run may change (engine/resume.py)
IDENTITY_SECTIONS = ("model", "rm", "data.tokenizer")
RESUMABLE = ("rm.exp_manager", "rm.trainer.rm.max_steps", "rm.trainer.rm.max_epochs", "rm.trainer.rm.val_check_interval",
             "rm.trainer.rm.save_interval", "rm.trainer.rm.log_every_n_steps", "rm.trainer.rm.limit_val_batches",
             "rm.model.torch_profile")


def load_rm_tokenizer(cfg, stage_dir: str):
    """The tokenizer the data was tokenized with (prep's artifact, `data.tokenizer.model`), else the
    model's own (`model.tokenizer` / the checkpoint). Returns (tokenizer, file to embed in the .nemo)."""
    from data_prep.tokenizers import load_tokenizer

    path, library = tokenizer_source(cfg, "rm")
    tok = load_tokenizer(path, library, extract_dir=os.path.join(stage_dir, "tokenizer"))
    tok_file = tok.path
    if tok.library == "huggingface" and not str(tok_file).endswith(".json"):
        os.makedirs(os.path.join(stage_dir, "tokenizer"), exist_ok=True)
        tok_file = tok.save(os.path.join(stage_dir, "tokenizer")) if D.is_main() else None
        tok_file = D.broadcast_object(tok_file)
    return tok, tok_file


def build_reward_model(model_cfg, vocab_size: int, seed: int):
    """Random init from the architecture keys (vocab = the tokenizer's, padded), or the
    checkpoint at `restore_from_path` with a reward head (fresh unless it has one)."""
    from modeling import RewardModel, load_pretrained
    from modeling.config import engine_switches
    from modeling.layers import init_weights

    switches = engine_switches(model_cfg)
    if model_cfg.restore_from_path:
        torch.manual_seed(seed)  # the fresh head's init
        return load_pretrained(model_cfg.restore_from_path, head="reward", dtype=torch.float32, **switches)
    cfg = dataclasses.replace(model_cfg)
    torch.manual_seed(seed)
    model = RewardModel(cfg, cfg.padded_vocab_size(vocab_size), with_lm_head=False)
    init_weights(model, cfg)
    return model


def _settings(rm: RMConfig, device: torch.device) -> LoopSettings:
    loop, m, ckpt = rm.trainer.rm, rm.model, rm.exp_manager.checkpoint_callback_params
    dtype = compute_dtype(rm.trainer.precision, device, "rm.trainer.precision")  # engine/precision.py
    amp = dtype if dtype != torch.float32 else None
    return LoopSettings(
        global_batch_size=m.global_batch_size, micro_batch_size=m.micro_batch_size, seed=m.seed,
        max_epochs=loop.max_epochs, max_steps=loop.max_steps, val_check_interval=loop.val_check_interval,
        save_interval=loop.save_interval, limit_val_batches=loop.limit_val_batches,
        gradient_clip_val=loop.gradient_clip_val, train_random_sampler=loop.train_random_sampler,
        val_random_sampler=loop.val_random_sampler, log_every_n_steps=max(1, loop.log_every_n_steps),
        length_grouping_window=m.data.length_grouping_window, max_micro_batch_tokens=m.data.max_micro_batch_tokens,
        pad_to_multiple=m.data.pad_to_multiple, packing=m.data.packing, packed_tokens=m.data.packed_tokens,
        packed_attention=m.data.packed_attention, autocast_dtype=amp, resume=rm.exp_manager.resume_if_exists,
        monitor=ckpt.monitor, mode=ckpt.mode, save_top_k=ckpt.save_top_k, filename=ckpt.filename,
        torch_profile=m.torch_profile, fsdp=m.fsdp)


def _check_schedule(rm: RMConfig, pairs: int) -> None:
    """The launcher's schedule rule again, with the real pair count (hub data, or a stage run by hand)."""
    from engine.schedule import check_run

    from engine.loop import run_length

    m, t = rm.model, rm.trainer.rm
    per_epoch = pairs // m.global_batch_size
    if per_epoch > 0:
        check_run("rm.model.optim", m.optim, run_length(t.max_steps, t.max_epochs, per_epoch, "rm.trainer.rm"),
                  f"{pairs} pairs / global_batch_size {m.global_batch_size} x max_epochs {t.max_epochs}, "
                  f"max_steps {t.max_steps}", log)


def run(cfg) -> dict:
    rm: RMConfig = _typed(cfg.rm, RMConfig)
    from modeling.config import ModelConfig, ModelTokenizerConfig
    from modeling import save_nemo as _save_nemo

    def save_nemo(module, path, **kw):  # modeling writes through mkstemp (0600): give it the umask's mode
        _save_nemo(module, path, **kw)
        fix_mode(path)

    model_cfg: ModelConfig = _typed(cfg.model, ModelConfig)
    stage_dir = os.path.abspath(rm.exp_manager.explicit_log_dir or _select(cfg, "run.stage_dir") or "results/rm")
    if D.is_main():
        os.makedirs(stage_dir, exist_ok=True)
    D.barrier()
    device = D.select_device(rm.trainer.accelerator)
    seed = rm.model.seed
    seed_everything(seed)

    tok, tok_file = load_rm_tokenizer(cfg, stage_dir)
    pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id
    prefixes = rm.model.data.data_prefix or {}
    seq_length = rm.model.data.seq_length
    def dataset(split: str) -> Optional[PairDataset]:
        entries = prefixes.get(split) or []
        return PairDataset(entries, seq_length, rm.model.data.overlong, seed, split) if entries else None
    train, val, test = dataset("train"), dataset("validation"), dataset("test")
    if train is None:
        raise ValueError("rm.model.data.data_prefix.train is empty: run the prep stage or set it")
    if val is None:
        log.warning("no validation data: val_loss cannot be monitored; top-k keeps the newest checkpoints")
    _check_schedule(rm, len(train))

    model = build_reward_model(model_cfg, tok.vocab_size, seed)
    model.config.tokenizer = ModelTokenizerConfig(library=tok.library, model=None)
    log.info("reward model: %s, %.1fM parameters, vocab %d, device %s, precision %s", model.config.name,
             model.num_parameters() / 1e6, model.vocab_size, device, rm.trainer.precision)

    ckpt_params = rm.exp_manager.checkpoint_callback_params
    def nemo_for(ckpt_path: str) -> str:
        return ckpt_path[: -len(".pt")] + ".nemo"
    def on_checkpoint(path: str, is_best: bool) -> None:
        if ckpt_params.always_save_nemo:
            save_nemo(trainer.exportable, nemo_for(path), tokenizer_path=tok_file)
    def on_remove(path: str) -> None:
        if os.path.exists(nemo_for(path)):
            os.remove(nemo_for(path))

    identity = stage_identity(cfg, IDENTITY_SECTIONS, RESUMABLE)
    if D.is_main():  # checkpoints of another config (or force=true) are moved aside, never resumed
        prepare_checkpoint_dir(os.path.join(stage_dir, "checkpoints"), identity, rm.exp_manager.resume_if_exists, "rm")
    D.barrier()
    settings = _settings(rm, device)
    trainer = RMTrainer(model, rm.model.optim, settings, train, val, pad_id, stage_dir, device,
                        on_checkpoint=on_checkpoint, on_remove=on_remove, identity=identity)
    _write_data_report(stage_dir, {"train": train, "validation": val, "test": test}, trainer)
    trainer.fit()

    result = {"metrics": trainer.logger.path, "checkpoints": os.path.join(stage_dir, "checkpoints")}
    if test is not None and len(test):
        t = trainer.evaluate(test, 1.0)
        trainer.logger.log(trainer.step, t, "test")
        log.info("test: loss %.4f accuracy %.4f (%d pairs)", t["loss"], t["accuracy"], t["pairs"])
        if D.is_main():
            path = os.path.join(stage_dir, "test_metrics.json")
            write_json(path, dict(t, step=trainer.step))
            result["test_metrics"] = path
    final = os.path.join(stage_dir, "checkpoints", f"{rm.exp_manager.name}.nemo")
    export = trainer.export_module()  # collective under FSDP (gathers the weights to rank 0)
    if D.is_main():
        best = trainer.ckpt.best()
        best_nemo = nemo_for(trainer.ckpt.path(best)) if best else None
        if ckpt_params.save_nemo_on_train_end or not (best_nemo and os.path.exists(best_nemo)):
            if not ckpt_params.save_nemo_on_train_end:
                log.warning("save_nemo_on_train_end=false and no best .nemo: exporting the final model anyway (ppo needs one)")
            save_nemo(export, final, tokenizer_path=tok_file)
        else:
            final = best_nemo
        log.info("reward model: %s", final)
        result["nemo"] = final
        result["plot"] = trainer.logger.plot(["loss", "accuracy"], title=f"reward model ({model.config.name})")
        result["report"] = os.path.join(stage_dir, "data_report.json")
    trainer.logger.close()
    D.barrier()
    return D.broadcast_object(result)


def _write_data_report(stage_dir: str, splits: dict, trainer: RMTrainer) -> None:
    if not D.is_main():
        return
    report = {name: ds.stats.as_dict() for name, ds in splits.items() if ds is not None}
    report["batching"] = {"steps_per_epoch": trainer.steps_per_epoch, "max_steps": trainer.max_steps,
                          "global_batch_size": trainer.s.global_batch_size,
                          "micro_batch_size": trainer.s.micro_batch_size, "data_parallel": trainer.dp,
                          "length_grouping_window": trainer.s.length_grouping_window,
                          "overlong": trainer.train_ds.overlong, "seq_length": trainer.train_ds.seq_length}
    write_json(os.path.join(stage_dir, "data_report.json"), report)
