"""`hydra/sweeper=kit` (conf/config.yaml): Hydra's basic sweeper (same points, order, batches and
launchers) that checks every point of the sweep before anything is written or submitted, and does so
composing the config tree once per distinct config-group choice instead of once per point.

Hydra composes a point in two steps: the defaults list and merge of the configs its group choices
select, then its `key=value` overrides applied in order. Points that differ only in `key=value`
overrides share the first step, the slow one (about 0.1 s for the kit's typed tree), so each point here
is a copy of its group choices' composition with its own overrides applied by Hydra's own function
(typed: a bad value fails as it would in a full composition), then checked by the kit's validation
(choices, batch arithmetic, parallelism, files). A bad point stops the sweep with exit status 2 and one
message naming the points, before anything is submitted. Each job still composes its own config in full
where it runs (the launcher does that) and validates it again before it runs.
"""
import copy
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Sequence

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, open_dict


@dataclass
class KitSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.rlhf_kit.kit_sweeper.KitSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="kit", node=KitSweeperConf, provider="rlhf-kit")


class KitSweeper(BasicSweeper):
    """BasicSweeper whose batch check composes once per group choice and runs the kit's validation."""

    _checked = False

    def sweep(self, arguments: List[str]) -> Any:
        # BasicSweeper writes multirun.yaml and then checks one batch at a time: check every point first
        assert self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides(self._parse_config() + list(arguments))
        self.check_points([p for batch in self.split_arguments(overrides, self.max_batch_size) for p in batch])
        self._checked = True
        return super().sweep(arguments)

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        if not self._checked:
            self.check_points(batch)

    def check_points(self, points: Sequence[Sequence[str]]) -> None:
        """Exit 2 naming the points whose config the kit refuses; nothing has been written or submitted."""
        from launcher.errors import ConfigError
        from launcher.validate import validate_request

        problems: Dict[str, List[int]] = {}
        for num, cfg in enumerate(self.point_configs(points)):
            try:
                validate_request(cfg, warn=lambda msg: None)  # dry-run warnings: each job logs its own
            except ConfigError as e:
                for msg in e.problems:
                    problems.setdefault(msg, []).append(num)
        if problems:
            err = ConfigError([f"{msg} ({_which(nums, points)})" for msg, nums in problems.items()])
            print(f"error: {err.render()}\nnothing was run or submitted", file=sys.stderr)
            sys.exit(2)

    def point_configs(self, points: Sequence[Sequence[str]]) -> Iterator[DictConfig]:
        """Each point's config as Hydra composes it, less the `hydra` node; composition errors raise as Hydra's."""
        assert self.hydra_context is not None and self.config is not None
        loader = self.hydra_context.config_loader
        parser = OverridesParser.create()
        composed: Dict[tuple, DictConfig] = {}
        for point in points:
            overrides = parser.parse_overrides(list(point))
            groups = tuple(o.input_line for o in overrides if self._is_group(o))
            if groups not in composed:  # the slow step, once per distinct group choice
                cfg = loader.load_sweep_config(self.config, list(groups))
                with open_dict(cfg):
                    del cfg["hydra"]  # Hydra's bookkeeping of the overrides; the job part is what is checked
                composed[groups] = cfg
            cfg = copy.deepcopy(composed[groups])
            ConfigLoaderImpl._apply_overrides_to_config([o for o in overrides if o.input_line not in groups], cfg)
            yield cfg

    def _is_group(self, o: Override) -> bool:
        """As Hydra decides: a config group choice, unless the value is a dict (a config override)."""
        if o.package is not None:
            return True
        if isinstance(o.value(), dict):
            return False
        return self.hydra_context.config_loader.repository.group_exists(o.key_or_group)  # type: ignore[attr-defined]


def _which(nums: List[int], points: Sequence[Sequence[str]]) -> str:
    if len(points) > 1 and len(nums) == len(points):
        return "every sweep point"
    common = set.intersection(*(set(p) for p in points))  # show what sets each point apart
    return "; ".join(f"sweep point #{n}: {' '.join(o for o in points[n] if o not in common) or '(no overrides)'}"
                     for n in nums)
