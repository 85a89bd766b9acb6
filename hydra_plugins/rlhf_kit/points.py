"""Sweep points as their jobs will see them, and the kit's check of them before anything is launched.

Hydra composes a point in two steps: the defaults list and merge of the configs its group choices
select, then its `key=value` overrides applied in order. Points that differ only in `key=value`
overrides share the first step, the slow one (about 0.1 s for the kit's typed tree), so each point here
is a copy of its group choices' composition with its own overrides applied by Hydra's own function
(typed: a bad value fails as it would in a full composition). The copy keeps its `hydra` node, made what
Hydra's launcher makes it for that job (its task overrides, `job.num`/`job.id`, `override_dirname`,
`runtime.output_dir`), and is checked with that node set as the job's HydraConfig, so `${hydra:...}`
values (`${hydra:job.num}`, `${hydra:runtime.choices.model}`, `${hydra:runtime.cwd}`) are the point's own.

Config groups are those of the run's whole search path (`hydra.searchpath`, a primary config's search
path, `--config-dir`), as Hydra recorded it in `hydra.runtime.config_sources`.
"""
from __future__ import annotations

import copy
import os
import sys
from typing import Dict, Iterator, List, Sequence, Tuple

from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
from hydra._internal.config_repository import ConfigRepository
from hydra._internal.config_search_path_impl import ConfigSearchPathImpl
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf, open_dict, read_write


def is_kit_config(cfg: DictConfig) -> bool:
    """The composed config is the kit's (its root is typed by launcher.config.KitConfig): the kit's
    checks apply. Another Hydra app that selects the kit's sweeper gets Hydra's behaviour unchanged."""
    t = OmegaConf.get_type(cfg)
    return t is not None and t.__name__ == "KitConfig" and t.__module__ == "launcher.config"


def search_path_repository(master: DictConfig) -> ConfigRepository:
    """The config repository of the run's whole search path, from what Hydra recorded composing it."""
    sp = ConfigSearchPathImpl()
    for src in master.hydra.runtime.config_sources:
        sp.append(src.provider, f"{src.schema}://{src.path}")
    return ConfigRepository(config_search_path=sp)


class PointComposer:
    """Each point's full config (its `hydra` node included), composed once per distinct group choice."""

    def __init__(self, hydra_context: HydraContext, master: DictConfig):
        self.loader = hydra_context.config_loader
        self.master = master
        self.repo = search_path_repository(master)
        self.parser = OverridesParser.create()
        self._composed: Dict[Tuple[str, ...], DictConfig] = {}
        self._task: Dict[Tuple[str, ...], Tuple[DictConfig, bool]] = {}  # without hydra; uses ${hydra:...}

    def is_group(self, o: Override) -> bool:
        """As Hydra decides: a config group choice, unless the value is a dict (a config override)."""
        if o.package is not None or o.key_or_group == "hydra.searchpath":  # searchpath: changes the groups
            return True
        if isinstance(o.value(), dict):
            return False
        return self.repo.group_exists(o.key_or_group)

    def _split(self, point: Sequence[str]) -> Tuple[List[Override], Tuple[str, ...], List[Override]]:
        overrides = self.parser.parse_overrides(list(point))
        groups = tuple(o.input_line for o in overrides if self.is_group(o))
        if groups not in self._composed:  # the slow step, once per distinct group choice
            full = self.loader.load_sweep_config(self.master, list(groups))
            task = copy.deepcopy(full)
            with open_dict(task):
                del task["hydra"]
            self._composed[groups] = full
            self._task[groups] = (task, "${hydra:" in OmegaConf.to_yaml(task))
        return overrides, groups, [o for o in overrides if o.input_line not in groups]

    def configs(self, points: Sequence[Sequence[str]], first_num: int = 0) -> Iterator[DictConfig]:
        """Each point's full config, its hydra node as Hydra's launcher makes it."""
        for num, point in enumerate(points, start=first_num):
            overrides, groups, rest = self._split(point)
            cfg = copy.deepcopy(self._composed[groups])
            ConfigLoaderImpl._apply_overrides_to_config(rest, cfg)  # hydra.* keys too: the node is kept
            self._as_launched(cfg, overrides, num)
            yield cfg

    def needs_hydra(self, point: Sequence[str]) -> bool:
        """Whether checking the point needs its hydra node: it sets hydra.* keys, or its config uses
        ${hydra:...}. Otherwise its job config alone is copied (the hydra node is most of the copying)."""
        overrides, groups, rest = self._split(point)
        return self._task[groups][1] or any(o.is_hydra_override() or "${hydra:" in str(o.value()) for o in rest)

    def task_config(self, point: Sequence[str]) -> DictConfig:
        """The point's job config without its hydra node, for a point that does not need it."""
        _, groups, rest = self._split(point)
        cfg = copy.deepcopy(self._task[groups][0])
        ConfigLoaderImpl._apply_overrides_to_config(rest, cfg)
        return cfg

    def _as_launched(self, cfg: DictConfig, overrides: List[Override], num: int) -> None:
        """The hydra node as Hydra's config loader and launcher make it for this job."""
        app = [o for o in overrides if not o.is_hydra_override()]
        h = cfg.hydra
        with read_write(h), open_dict(h):
            h.overrides.task = [o.input_line for o in app]
            h.overrides.hydra = list(self.master.hydra.overrides.hydra) + [
                o.input_line for o in overrides if o.is_hydra_override()]
            d = h.job.config.override_dirname
            h.job.override_dirname = get_overrides_dirname(overrides=app, kv_sep=d.kv_sep, item_sep=d.item_sep,
                                                           exclude_keys=list(d.exclude_keys))
            h.job.id = num
            h.job.num = num


def job_configs(composer: PointComposer, points: Sequence[Sequence[str]], first_num: int = 0) -> Iterator[DictConfig]:
    """Each point's job config (no `hydra` node) while its hydra node is the current HydraConfig, as in
    Hydra's run_job; the HydraConfig before is restored afterwards."""
    hc = HydraConfig.instance()
    before = hc.cfg
    try:
        for num, point in enumerate(points, start=first_num):
            if not composer.needs_hydra(point):
                yield composer.task_config(point)
                continue
            cfg = next(composer.configs([point], num))
            hc.set_config(cfg)
            out = OmegaConf.select(cfg, "hydra.sweep.dir")
            sub = OmegaConf.select(cfg, "hydra.sweep.subdir")
            with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
                cfg.hydra.runtime.output_dir = os.path.abspath(os.path.join(str(out), str(sub)))
            hc.set_config(cfg)
            with open_dict(cfg):
                del cfg["hydra"]  # HydraConfig keeps its own copy, whose parent is this config
            yield cfg
    finally:
        hc.cfg = before


def point_problems(composer: PointComposer, points: Sequence[Sequence[str]], first_num: int = 0) -> List[List[str]]:
    """For each point, what the kit's validation refuses in it (empty: the point may run)."""
    from launcher.errors import ConfigError
    from launcher.validate import validate_request

    out: List[List[str]] = []
    for cfg in job_configs(composer, points, first_num):
        try:
            validate_request(cfg, warn=lambda msg: None)  # dry-run warnings: each job logs its own
            out.append([])
        except ConfigError as e:
            out.append(list(e.problems))
    return out


def check_points(composer: PointComposer, points: Sequence[Sequence[str]], first_num: int = 0) -> None:
    """Exit 2 naming the points whose config the kit refuses; nothing of them has been written or submitted
    (`first_num`: how many points of the sweep were launched before these)."""
    from launcher.errors import ConfigError

    problems: Dict[str, List[int]] = {}
    for i, msgs in enumerate(point_problems(composer, points, first_num)):
        for msg in msgs:
            problems.setdefault(msg, []).append(i)
    if problems:
        err = ConfigError([f"{msg} ({_which(nums, points, first_num)})" for msg, nums in problems.items()])
        done = f"these points were not launched ({first_num} before them were)" if first_num else \
            "nothing was run or submitted"
        print(f"error: {err.render()}\n{done}", file=sys.stderr)
        sys.exit(2)


def _which(nums: List[int], points: Sequence[Sequence[str]], first_num: int) -> str:
    if len(points) > 1 and len(nums) == len(points):
        return "every sweep point"
    common = set.intersection(*(set(p) for p in points)) if len(points) > 1 else set()  # what sets each apart
    return "; ".join(f"sweep point #{n + first_num}: "
                     f"{' '.join(o for o in points[n] if o not in common) or ' '.join(points[n]) or '(no overrides)'}"
                     for n in nums)
