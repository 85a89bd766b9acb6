"""`hydra/sweeper=kit` (the kit's choice in conf/): Hydra's basic sweeper (same points, order, batches and
launchers) that checks every point of the sweep before anything is written or submitted, and does so
composing the config tree once per distinct config-group choice instead of once per point (points.py).

A bad point stops the sweep with exit status 2 and one message naming the points, before anything is
submitted. Each job still composes its own config in full where it runs (the launcher does that) and
validates it again before it runs. An app other than the kit that selects this sweeper gets
BasicSweeper's behaviour unchanged (Hydra's own sweeper and launcher test suites run against it:
tests/test_hydra_suites.py).
"""
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser

from hydra_plugins.rlhf_kit.points import PointComposer, check_points, is_kit_config


@dataclass
class KitSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.rlhf_kit.kit_sweeper.KitSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="kit", node=KitSweeperConf, provider="rlhf-kit")


class KitSweeper(BasicSweeper):
    """BasicSweeper whose batch check composes once per group choice and runs the kit's validation."""

    _composer: Optional[PointComposer] = None

    def sweep(self, arguments: List[str]) -> Any:
        assert self.hydra_context is not None and self.config is not None
        if is_kit_config(self.config):
            # BasicSweeper writes multirun.yaml and then checks one batch at a time: check every point first
            parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
            overrides = parser.parse_overrides(self._parse_config() + list(arguments))
            self._composer = PointComposer(self.hydra_context, self.config)
            check_points(self._composer, [p for b in self.split_arguments(overrides, self.max_batch_size) for p in b])
        return super().sweep(arguments)

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        if self._composer is None:  # not the kit: Hydra's check, composing each point
            super().validate_batch_is_legal(batch)
