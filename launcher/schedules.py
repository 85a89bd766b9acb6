"""Each trainer's learning-rate schedule over the run it is about to do, worked out before anything runs.

The number of optimizer steps depends on the data (rm: pairs / global batch x epochs; ppo: PPO steps x
ppo_epochs x rollouts / global batch), so it is counted from the inputs the stage will read: a data
prefix's .idx or a prompts JSONL (given, or recorded by an earlier run), or, when the prep stage of
this run has still to write them, the records of prep's train split (an upper bound: prep drops a few).
Only the hub source cannot be counted here; the stage then checks when it starts (same rule).
"""
from __future__ import annotations

import gzip
import math
import struct
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from engine.schedule import shape, trap

_IDX_MAGIC = b"MMIDIDX\x00\x00"


@dataclass
class RunLength:
    key: str  # the optimizer's config key (rm.model.optim)
    steps: int  # optimizer steps of the run
    how: str  # where that number comes from, in the user's keys


def idx_sequences(prefix: str) -> int:
    """Sequences in a Megatron `<prefix>.idx` (its header's count; 2 per reward pair)."""
    with open(prefix + ".idx", "rb") as f:
        head = f.read(9 + 8 + 1 + 8)
    if head[:9] != _IDX_MAGIC:
        raise ValueError(f"{prefix}.idx is not a Megatron mmap index")
    return struct.unpack("<Q", head[18:26])[0]


def count_lines(path: str) -> int:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _prefixes(value: Any) -> List[str]:
    """The paths of a Megatron data-prefix list (weights of a blend skipped)."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    items = value if isinstance(value, list) else [value] if value else []
    return [str(x) for x in items if isinstance(x, str)]


def prep_train_records(cfg: DictConfig) -> Optional[int]:
    """Records in prep's train split, before prep runs (None: the hub, or files not there yet)."""
    from data_prep.sources import split_files

    if cfg.data.source not in ("sample", "local"):
        return None
    try:
        n = sum(count_lines(p) for p in split_files(cfg.data, "train"))
    except (OSError, ValueError):
        return None
    return min(n, cfg.data.max_pairs) if cfg.data.max_pairs else n


def train_count(cfg: DictConfig, stage: str, deferred: Dict[str, str]) -> Tuple[Optional[int], str]:
    """(pairs for rm / prompts for ppo, where the number comes from)."""
    key = f"{stage}.model.data.data_prefix"
    if key not in deferred:
        paths = _prefixes(OmegaConf.select(cfg, f"{key}.train"))
        try:
            if stage == "rm":
                return sum(idx_sequences(p) for p in paths) // 2, "pairs in " + ", ".join(paths)
            return sum(count_lines(p) for p in paths), "prompts in " + ", ".join(paths)
        except (OSError, ValueError):
            return None, ""
    n = prep_train_records(cfg)
    return n, f"about {n} records in prep's train split" if n is not None else ""


def run_lengths(cfg: DictConfig, stage: str, n: int, where: str) -> List[RunLength]:
    """The optimizer steps of each trained model of `stage`, from `n` train pairs (rm) or prompts (ppo)."""
    if stage == "rm":
        m, t = cfg.rm.model, cfg.rm.trainer.rm
        per_epoch = n // m.global_batch_size
        by_epochs = t.max_epochs * per_epoch if t.max_epochs and t.max_epochs > 0 else None
        by_steps = t.max_steps if t.max_steps and t.max_steps > 0 else None
        steps = min(x for x in (by_epochs, by_steps) if x is not None) if (by_epochs or by_steps) else 0
        how = (f"{where}: {n} pairs / global_batch_size {m.global_batch_size} x max_epochs {t.max_epochs}"
               + (f", capped by max_steps {t.max_steps}" if by_steps is not None else ""))
        return [RunLength("rm.model.optim", steps, how)]
    p, t = cfg.ppo, cfg.ppo.trainer.ppo
    rollouts = p.model.ppo.num_rollout_samples
    # engine.loop.run_length's rule, as the stage applies it: whichever of max_steps and max_epochs comes first
    by_epochs = t.max_epochs * math.ceil(n / rollouts) if t.max_epochs and t.max_epochs > 0 else None
    if t.max_steps and t.max_steps > 0 and (by_epochs is None or t.max_steps <= by_epochs):
        ppo_steps, length = t.max_steps, f"max_steps {t.max_steps}"
    else:
        ppo_steps = by_epochs or 0
        length = f"max_epochs {t.max_epochs} x ceil({n} prompts / {rollouts} rollouts) = {ppo_steps} PPO steps ({where})"
    epochs = p.model.ppo.ppo_epochs
    out = []
    for name, section, skip in (("actor", p.model, t.critic_warmup_steps), ("critic", p.critic, 0)):
        per = max(1, rollouts // section.global_batch_size)
        steps = max(1, ppo_steps - skip) * epochs * per
        how = (f"{length}{f' - critic_warmup_steps {skip}' if skip else ''} x ppo_epochs {epochs} x "
               f"{rollouts} rollouts / {name} global_batch_size {section.global_batch_size}")
        out.append(RunLength("ppo.model.optim" if name == "actor" else "ppo.critic.optim", steps, how))
    return out


def check_stage(cfg: DictConfig, stage: str, deferred: Dict[str, str]) -> Tuple[List[str], List[str]]:
    """(problems, one line per schedule for the dry run and the log) for an rm or ppo stage."""
    if stage not in ("rm", "ppo"):
        return [], []
    n, where = train_count(cfg, stage, deferred)
    if n is None:
        return [], [f"{stage}: schedules are checked when the stage starts (its data is not countable yet)"]
    problems, lines = [], []
    for rl in run_lengths(cfg, stage, n, where):
        optim = OmegaConf.select(cfg, rl.key)
        if rl.steps < 1:
            continue  # the batch arithmetic check names the keys
        try:
            lines.append(f"{rl.key}: {shape(optim, rl.steps).describe()}  [{rl.how}]")
            msg = trap(rl.key, optim, rl.steps, rl.how)
        except (ValueError, TypeError):
            continue  # a bad schedule name: validate() says so
        if msg:
            problems.append(msg)
    return problems, lines
