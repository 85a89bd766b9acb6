"""`hydra.callbacks.kit_sweeper_check` (conf/hydra/kit.yaml): a sweeper chosen by its plain Hydra name gets
the kit's check of every point before it is launched, as the kit's own sweepers do.

Hydra calls `on_multirun_start` after composing a sweep's config and before it instantiates the
sweeper, so the sweeper node can still be pointed at the kit's subclass of the same sweeper (same
parameters, same search; only the check added): `hydra/sweeper=basic` becomes `kit`, `hydra/sweeper=optuna`
becomes `kit_optuna`. A sweeper the kit has no checked counterpart for is left as it is, with a warning:
its points are then validated only by each job, when it runs.
"""
from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from hydra_plugins.rlhf_kit.points import is_kit_config

log = logging.getLogger("hydra")  # configured by hydra_logging at this point (the kit's own is not yet)
CHECKED = {  # a plain sweeper's _target_ -> the kit's subclass of it that checks each point first
    "hydra._internal.core_plugins.basic_sweeper.BasicSweeper": "hydra_plugins.rlhf_kit.kit_sweeper.KitSweeper",
    "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper": "hydra_plugins.rlhf_kit.search.KitOptunaSweeper",
}
KIT_SWEEPERS = set(CHECKED.values()) | {"hydra_plugins.rlhf_kit.search.OptunaMissing"}


class SweeperCheck(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_kit_config(config):
            return
        sweeper = config.hydra.sweeper
        target = str(sweeper.get("_target_", ""))
        if target in KIT_SWEEPERS:
            return
        if target in CHECKED:
            with read_write(sweeper), open_dict(sweeper):
                sweeper._target_ = CHECKED[target]
            log.info("hydra/sweeper: %s runs as the kit's %s, which checks every point before it is launched",
                     target.rsplit(".", 1)[-1], CHECKED[target].rsplit(".", 1)[-1])
            return
        log.warning("hydra/sweeper: %s has no counterpart in the kit that checks each point before it is launched "
                    "(hydra/sweeper=kit, kit_optuna do); each job validates its own config when it starts", target)
