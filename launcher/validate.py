"""Everything that can be checked before a stage runs or is submitted.

Two passes: `check_overrides` reads the command line before Hydra composes (so a typo gets a
suggestion rather than Hydra's bare "not in struct"), and `validate` checks the composed config:
missing values, choices, parallelism and batch arithmetic, and that every stage's inputs exist
or are produced by an earlier stage of the same run.
"""
from __future__ import annotations

import copy
import functools
import logging
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from launcher.config import KitConfig
from launcher.errors import ConfigError, suggest
from launcher.manifest import artifact_exists
from launcher.stages import REGISTRY, parse_stage_selection
from launcher.tracking import config_problems as tracking_problems
from launcher.inputs import checkpoint_problems, trainable_vocab_problems, vocab_problems
from engine.schedule import COSINE_SCHEDULE, SCHEDULE_NAMES

log = logging.getLogger("launcher")
# String keys with a fixed set of values (the dataclasses keep them as str for NeMo parity).
CHOICES: Dict[str, Sequence[str]] = {
    "data.source": ("sample", "hub", "local"),
    "data.tokenizer.library": (None, "sentencepiece", "huggingface", "nemo"),
    "model.precision": ("bf16", "fp32", "32", "bf16-mixed", "16"),
    "model.normalization": ("layernorm1p", "layernorm", "rmsnorm"),
    "model.activation": ("fast-swiglu", "swiglu", "gelu"),
    "model.position_embedding_type": ("rope",),
    "cluster.name": ("local", "slurm"),
    "cluster.gpu_option": ("gpus_per_node", "gres"),
    "rm.model.reward_model_type": ("binary_ranking",),
    "rm.model.data.data_impl": ("mmap",),
    "rm.model.data.overlong": ("truncate", "drop"),
    "rm.model.data.packed_attention": ("auto", "varlen", "flex", "mask"),
    "rm.model.optim.sched.name": ("CosineAnnealing", "constant"),
    "rm.exp_manager.checkpoint_callback_params.mode": ("min", "max"),
    "ppo.model.data.data_impl": ("jsonl",),
    "ppo.model.optim.sched.name": ("CosineAnnealing", "constant"),
    "ppo.critic.optim.sched.name": ("CosineAnnealing", "constant"),
}
# Top-level names that are config groups (Hydra resolves these itself).
GROUPS = ("model", "data", "rm", "ppo", "cluster", "experiment")
HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name",
                          "-cn", "--config-dir", "-cd", "--experimental-rerun", "--shell-completion",
                          "--info"}


@functools.lru_cache(maxsize=1)
def schema() -> DictConfig:
    """KitConfig as a config, built once per process (tens of ms; the ConfigStore copies it): never written."""
    return OmegaConf.structured(KitConfig)


def _try_value(kit: DictConfig, key: str, value: Any) -> None:
    """Set `key` to `value` in a copy of the smallest schema node holding it: raises as the full schema would."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(kit, parent_key) if parent_key else None
    if isinstance(parent, DictConfig) and not parent._is_none():
        trial = copy.deepcopy(parent)  # keeps its place in the schema (parent link, types), not its siblings
    else:
        trial, leaf = copy.deepcopy(kit), key
    OmegaConf.update(trial, leaf, value, merge=True)


def check_key(schema: DictConfig, key: str) -> str | None:
    """None if `key` names a config key, else a message with close matches."""
    node: Any = schema
    parts = key.split(".")
    for i, part in enumerate(parts):
        here = ".".join(parts[:i]) or "the top level"
        if isinstance(node, DictConfig) and (node._is_none() or OmegaConf.get_type(node) is dict):
            return None  # a Dict[str, Any] field (data_prefix, env...): any sub-key is allowed
        if isinstance(node, ListConfig):
            return None if part.isdigit() else f"'{here}' is a list; '{part}' is not an index"
        if not isinstance(node, DictConfig):
            return f"unknown key '{key}': '{here}' is a value, it has no key '{part}'"
        if part not in node.keys():  # `in` is False for keys whose value is ??? 
            return f"unknown key '{key}': '{part}' is not a key of {here}.{suggest(part, node.keys())}"
        node = node._get_node(part)
    return None


def check_overrides(args: Sequence[str], is_group: Callable[[str], bool] = GROUPS.__contains__) -> None:
    """Fail on unknown keys and values of the wrong type in command-line overrides."""
    problems = override_problems(args, is_group)
    if problems:
        raise ConfigError([msg for _, msg in problems])


def override_problems(args: Sequence[str], is_group: Callable[[str], bool] = GROUPS.__contains__) -> List[tuple]:
    """(argument, problem) for each command-line override with an unknown key or a value of the wrong
    type. `+key=value` adds a key: only where the schema has a free-form dict (`+cluster.env.X=1`); a
    `+` typo of a typed key (`+rm.model.optm.lr=1e-4`) is refused as a plain typo is.

    `is_group`: whether a name is a config group (launcher.cli asks Hydra's search path)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, OverrideType

    plain, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg.startswith("-"):
            skip = arg in HYDRA_FLAGS_WITH_VALUE and arg != "--info"
            continue
        plain.append(arg)
    try:
        overrides = OverridesParser.create().parse_overrides(plain)
    except Exception:  # Hydra reports syntax errors itself, with the position
        return []
    kit = schema()
    problems: List[tuple] = []
    for o in overrides:
        key = o.key_or_group
        if o.package is not None or key.startswith("hydra") or "." not in key and is_group(key):
            continue  # config-group choices and Hydra's own keys: Hydra checks those
        if o.type == OverrideType.DEL:
            continue
        msg = check_key(kit, key)
        if msg and o.type == OverrideType.ADD:
            msg = f"+{key}: adds a key the schema does not have; " + msg
        if msg:
            problems.append((o.input_line, msg))
            continue
        if o.type == OverrideType.ADD:
            continue  # an existing key: Hydra says `+` cannot add it twice
        values = o.value().list if isinstance(o.value(), ChoiceSweep) else [o.value()] if not o.is_sweep_override() else []
        for value in values:  # each value of a sweep (rm.model.optim.lr=1e-5,5e-6)
            try:
                _try_value(kit, key, value)
            except OmegaConfBaseException as e:
                problems.append((o.input_line, f"{key}={value!r}: {str(e).splitlines()[0]}"))
                break
            except Exception:  # noqa: BLE001 - shapes Hydra itself explains better (a dict into a None)
                break
    return problems


def unknown_keys(cfg: Any, node: Any = None, prefix: str = "") -> List[str]:
    """Keys of the composed config that the schema does not have (added with `+`, or by a config file
    of a user's search path): each would fail the stage's typed config after earlier stages ran."""
    node = schema() if node is None else node
    out: List[str] = []
    if not isinstance(cfg, DictConfig) or cfg._is_none() or cfg._is_missing():
        return out
    if not isinstance(node, DictConfig) or node._is_none() or OmegaConf.get_type(node) is dict:
        return out  # a free-form dict (cluster.env, data_prefix...) or a value: anything goes
    for k in cfg.keys():
        key = f"{prefix}{k}"
        if k == "hydra" and not prefix:
            continue
        if k not in node.keys():
            out.append(f"unknown key '{key}': '{k}' is not a key of {prefix[:-1] or 'the top level'}."
                       f"{suggest(str(k), node.keys())}")
            continue
        out += unknown_keys(cfg._get_node(k), node._get_node(k), key + ".")
    return out


def missing_keys(node: Any, prefix: str = "") -> List[str]:
    """Keys whose value is `???`, without resolving interpolations (which would raise on them)."""
    out: List[str] = []
    if isinstance(node, DictConfig) and not node._is_none() and not node._is_missing():
        items = [(str(k), node._get_node(k)) for k in node.keys()]
    elif isinstance(node, ListConfig) and not node._is_none() and not node._is_missing():
        items = [(str(i), node._get_node(i)) for i in range(len(node))]
    else:
        return out
    for k, child in items:
        key = f"{prefix}{k}"
        if child._is_missing() and not child._is_interpolation():
            out.append(key)
        else:
            out += missing_keys(child, key + ".")
    return out


def _missing(cfg: DictConfig, sections: Sequence[str]) -> List[str]:
    out = []
    for top in cfg.keys():  # only the top-level sections asked for (a sweep checks each point: keep it cheap)
        if top not in sections:
            continue
        node = cfg._get_node(top)
        keys = [top] if node._is_missing() and not node._is_interpolation() else missing_keys(node, f"{top}.")
        out += [f"missing value for '{key}': set it on the command line ({key}=...)" for key in keys]
    return out


def _choices(cfg: DictConfig) -> List[str]:
    out = []
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        if value not in allowed:
            names = [a for a in allowed if a is not None]
            out.append(f"{key}={value!r} is not one of {names}.{suggest(str(value), names)}")
    return out


def _parallelism(cfg: DictConfig, stages: Sequence[str]) -> List[str]:
    out = []
    c, m = cfg.cluster, cfg.model
    procs = c.processes_per_node if c.processes_per_node is not None else max(1, c.gpus_per_node)
    world = c.nodes * procs
    tp, pp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size
    if c.nodes < 1:
        out.append(f"cluster.nodes={c.nodes} must be >= 1")
    if c.gpus_per_node < 0:
        out.append(f"cluster.gpus_per_node={c.gpus_per_node} must be >= 0 (0 = CPU)")
    if c.processes_per_node is not None and c.processes_per_node < 1:
        out.append(f"cluster.processes_per_node={c.processes_per_node} must be >= 1")
    if out:
        return out  # the arithmetic below needs a positive process count
    if c.processes_per_node is not None and c.gpus_per_node > 0 and c.processes_per_node != c.gpus_per_node:
        out.append(f"cluster.processes_per_node={c.processes_per_node} must equal cluster.gpus_per_node="
                   f"{c.gpus_per_node}: one process per GPU")
    if tp != 1 or pp != 1:
        out.append(f"model.tensor_model_parallel_size={tp}, pipeline_model_parallel_size={pp}: the kit's "
                   "PyTorch engine is data parallel only (tp=1, pp=1); GPT-2B-001 fits one GPU at tp1")
    if world % (tp * pp):
        out.append(f"tp x pp = {tp * pp} does not divide the {world} processes requested "
                   f"(cluster.nodes={c.nodes} x {procs} per node)")
        return out
    dp = world // (tp * pp)
    for stage in _training(stages):
        t = cfg[stage].trainer
        if t.devices != c.gpus_per_node or t.num_nodes != c.nodes:
            out.append(f"{stage}.trainer.devices={t.devices}, num_nodes={t.num_nodes} disagree with "
                       f"cluster.gpus_per_node={c.gpus_per_node}, cluster.nodes={c.nodes}: set the cluster keys")
        for name in REGISTRY[stage].batches:
            node = OmegaConf.select(cfg, name)
            gbs, mbs = node.global_batch_size, node.micro_batch_size
            # SFT's and DPO's packing fill micro-batches by tokens: micro_batch_size is not used there
            if stage in ("sft", "dpo") and (OmegaConf.select(node, "packed_sequence", default=False) or
                                            OmegaConf.select(node, "data.packing", default=False)):
                if gbs < 1 or gbs % dp:
                    out.append(f"{name}.global_batch_size={gbs} is not divisible by the data-parallel size {dp} "
                               "(= nodes x processes per node / (tp x pp))")
                continue
            if mbs < 1 or gbs < 1 or gbs % (mbs * dp):
                out.append(f"{name}.global_batch_size={gbs} is not divisible by micro_batch_size={mbs} x "
                           f"data-parallel size {dp} (= nodes x processes per node / (tp x pp))")
        rule = STAGE_RULES.get(stage)
        if rule:
            out += rule(cfg, dp)
    return out


def _rollouts(cfg: DictConfig, dp: int) -> List[str]:
    """PPO's rollout batch: split over the ranks, into rollout micro-batches, and into whole optimizer
    batches of the actor and of the critic (ppo/optimization.py refuses the rest after prep and rm ran)."""
    out = []
    r = cfg.ppo.model.ppo
    n = r.num_rollout_samples
    if n < 1 or r.rollout_micro_batch_size < 1 or n % (r.rollout_micro_batch_size * dp):
        out.append(f"ppo.model.ppo.num_rollout_samples={n} is not divisible by "
                   f"rollout_micro_batch_size={r.rollout_micro_batch_size} x data-parallel size {dp}")
        return out
    for name in ("ppo.model", "ppo.critic"):
        gbs = OmegaConf.select(cfg, f"{name}.global_batch_size")
        if gbs >= 1 and n % gbs == 0 or gbs < 1 or gbs % dp:
            continue  # whole optimizer batches (or a global batch already refused above)
        out.append(f"{name}.global_batch_size={gbs}: ppo.model.ppo.num_rollout_samples={n} ({n // dp} per rank "
                   f"x {dp} ranks) do not split into whole optimizer batches of {gbs} ({gbs // dp} per rank); "
                   f"make num_rollout_samples a multiple of {name}.global_batch_size")
    return out


# rules about one stage's own keys (a stage without any needs no line here)
STAGE_RULES: Dict[str, Callable[[DictConfig, int], List[str]]] = {"ppo": _rollouts}


def _training(stages: Sequence[str]) -> List[str]:
    """The stages asked for that run the engine's training loop (the registry says which)."""
    return [s for s in stages if REGISTRY[s].trainer]


def _cluster(cfg: DictConfig) -> List[str]:
    out = []
    # what every launch script holds (launch.sh, the batch script): one line each, names a shell takes
    for key in ("run.name", "run.dir"):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, str) and ("\n" in value or "\r" in value):
            out.append(f"{key}={value!r}: holds a line break, which would put a line of its own in the rendered "
                       "launch script")
    for name in cfg.cluster.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(name)):
            out.append(f"cluster.env.{name}: {str(name)!r} is not an environment variable name (letters, digits "
                       "and _, not starting with a digit)")
    if cfg.cluster.name != "slurm":
        return out
    from launcher import slurm  # the one module that knows Slurm's options and times

    return out + slurm.cluster_problems(cfg.cluster) + slurm.run_dir_problems(cfg.run.dir)


def _local_path(path: str | None) -> bool:
    return bool(path) and not str(path).startswith(("pkg:", "nemo:", "hf:"))


def _files(cfg: DictConfig, stages: Sequence[str]) -> List[str]:
    out = []
    d = cfg.data
    if "prep" in stages:
        if d.source == "local":
            if not d.path:
                out.append("data.source=local needs data.path (an HH .jsonl/.jsonl.gz file or directory)")
            elif not Path(d.path).exists():
                out.append(f"data.path={d.path}: no such file or directory")
        if _local_path(d.tokenizer.model) and not Path(d.tokenizer.model).exists():
            out.append(f"data.tokenizer.model={d.tokenizer.model}: no such file")
    for key in sorted({k for s in stages for k in REGISTRY[s].checkpoints}):
        path = OmegaConf.select(cfg, key)
        if not _local_path(path):
            continue
        if not Path(path).exists():
            out.append(f"{key}={path}: no such file or directory")
        else:
            out += checkpoint_problems(key, path)
    for key in sorted({k for s in stages for k in REGISTRY[s].files}):
        path = OmegaConf.select(cfg, key)
        if _local_path(path) and not artifact_exists(str(path)):
            out.append(f"{key}={path}: no such file (nor a data prefix with .bin and .idx)")
    if _training(stages) and not out:
        out += vocab_problems(cfg, stages)
    return out


def validate_request(cfg: DictConfig, warn: Optional[Callable[[str], None]] = None) -> List[str]:
    """Everything checked before planning: the stage selection, then `validate`. Returns the stages."""
    stages, problems = request_problems(cfg, warn)
    if problems:
        raise ConfigError(problems)
    return stages


def request_problems(cfg: DictConfig, warn: Optional[Callable[[str], None]] = None) -> tuple:
    """(the stages asked for, every problem `validate` finds); no stages when the selection is wrong."""
    try:
        stages = parse_stage_selection(cfg.stage)
    except ValueError as e:
        return [], [str(e)]
    try:
        validate(cfg, stages, dry_run=cfg.dry_run, warn=warn)
    except ConfigError as e:
        return stages, list(e.problems)
    return stages, []


def _warn_dry_run(msg: str) -> None:
    log.warning("dry run: %s (an error when run for real)", msg)


def _profile(cfg: DictConfig, stages: Sequence[str]) -> List[str]:
    out = []
    for stage in _training(stages):
        p = cfg[stage].model.torch_profile
        if p.enabled and not 1 <= p.start_step <= p.end_step:
            out.append(f"{stage}.model.torch_profile: start_step={p.start_step}, end_step={p.end_step}: "
                       "need 1 <= start_step <= end_step (1-based steps)")
    return out


def _optim(cfg: DictConfig, stages: Sequence[str]) -> List[str]:
    """lr and schedule values the optimizer would only refuse after the stages before it ran."""
    out = []
    for name in [o for s in stages for o in REGISTRY[s].optimizers]:
        o = OmegaConf.select(cfg, name)
        if not o.lr > 0:
            out.append(f"{name}.lr={o.lr} must be > 0")
        sched = o.get("sched")
        if sched is None:
            continue
        for key in ("warmup_steps", "constant_steps"):
            if (sched.get(key) or 0) < 0:
                out.append(f"{name}.sched.{key}={sched.get(key)} must be >= 0")
        kind = sched.get("name")
        if kind not in SCHEDULE_NAMES:
            out.append(f"{name}.sched.name={kind!r} is not one of {list(SCHEDULE_NAMES)}")
        min_lr = sched.get("min_lr")
        if kind == COSINE_SCHEDULE and min_lr is not None and min_lr > o.lr > 0:
            out.append(f"{name}.sched.min_lr={min_lr} is above {name}.lr={o.lr}: the cosine schedule "
                       "decays from lr down to min_lr; lower min_lr or raise lr")
    return out


def _loop(cfg: DictConfig, stages: Sequence[str]) -> List[str]:
    """Run length and intervals that the trainers would only refuse (or divide by) after the stages
    before them ran. -1 (or null) is NeMo's "no limit" for max_steps and max_epochs."""
    out = []
    for stage in _training(stages):
        name = f"{stage}.trainer.{stage}"
        t = OmegaConf.select(cfg, name)
        limits = {k: t.get(k) for k in ("max_epochs", "max_steps")}
        for key, value in limits.items():
            if value is not None and value != -1 and value < 1:
                out.append(f"{name}.{key}={value} must be >= 1, or -1 for no limit")
        if not any(v is not None and v >= 1 for v in limits.values()):
            out.append(f"{name}: max_epochs={limits['max_epochs']} and max_steps={limits['max_steps']} set no "
                       "length; give one of them a positive value")
        for key in ("val_check_interval", "save_interval", "log_every_n_steps"):
            if key in t and t[key] < 0:
                out.append(f"{name}.{key}={t[key]} must be >= 0 (steps)")
        if "limit_val_batches" in t and t.limit_val_batches < 0:
            out.append(f"{name}.limit_val_batches={t.limit_val_batches} must be >= 0 (a fraction <= 1.0 or a "
                       "number of batches)")
        if (t.get("critic_warmup_steps") or 0) < 0:
            out.append(f"{name}.critic_warmup_steps={t.critic_warmup_steps} must be >= 0")
    return out


def _engine(cfg: DictConfig, stages: Sequence[str]) -> List[str]:
    budget = cfg.model.activation_memory_budget
    if _training(stages) and not 0 < budget <= 1:
        return [f"model.activation_memory_budget={budget} must be in (0, 1]: the fraction of the activations "
                "a compiled backward may keep (1 = all)"]
    return []


def validate(cfg: DictConfig, stages: Sequence[str], dry_run: bool = False,
             warn: Optional[Callable[[str], None]] = None) -> None:
    """Raise ConfigError listing every problem found in the composed config.

    `warn`: what a dry run does with problems that are only errors when run for real (default: log them)."""
    wanted = ["run", "cluster"] + sorted({s for st in stages for s in REGISTRY[st].sections})
    problems = unknown_keys(cfg) + _missing(cfg, wanted)
    if problems:  # the rules below would trip over the missing values
        raise ConfigError(problems)
    problems += _choices(cfg)
    problems += _parallelism(cfg, stages)
    problems += _cluster(cfg)
    problems += _profile(cfg, stages)
    problems += _optim(cfg, stages)
    problems += _loop(cfg, stages)
    problems += _engine(cfg, stages)
    problems += tracking_problems(cfg, stages)  # logger= (its package installed), optimized_metric
    if "prep" in stages:
        problems += trainable_vocab_problems(cfg)
    files = _files(cfg, stages)
    if dry_run:  # a dry run previews a config for another machine: missing files are warnings
        for msg in files:
            (warn or _warn_dry_run)(msg)
    else:
        problems += files
    if problems:
        raise ConfigError(problems)
