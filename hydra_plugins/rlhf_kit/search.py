"""Search sweepers with the kit's check of each point before it is launched: `hydra/sweeper=kit_optuna`
(conf/hparams_search/rm_optuna.yaml selects it), Optuna's sweeper as hydra-optuna-sweeper ships it.

A search sweeper asks for a batch of points, launches it, and reads each job's return value (the kit's
job returns `optimized_metric`'s value). Here its launcher is wrapped: before a batch is launched each
point is composed and validated as its job will see it (points.py), and a point the kit refuses is never
launched. With hydra.sweeper.max_failure_rate 0 (Optuna's default: any failed trial ends the search) the
search stops there as the kit's sweeper does, exit status 2 and the point named; above it, the point comes
back as a failed trial whose error names its problems, and the search goes on. An app other than the kit
gets the sweeper unchanged. Registered only when hydra-optuna-sweeper is installed (`pip install
'rlhf-kit[optuna]'`); without it, selecting kit_optuna says so.
"""
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.rlhf_kit.points import PointComposer, check_points, is_kit_config, point_problems

NEEDS = "hydra/sweeper=kit_optuna needs hydra-optuna-sweeper: pip install 'rlhf-kit[optuna]'"


class PointRefused(Exception):
    """A point the kit's validation refuses: never launched."""


class CheckedLauncher(Launcher):
    """Any launcher, with every point of a batch checked before the batch is launched."""

    def __init__(self, inner: Launcher, composer: PointComposer, tolerate_failures: bool):
        self.inner, self.composer, self.tolerate_failures = inner, composer, tolerate_failures

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.inner.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        if not self.tolerate_failures:
            check_points(self.composer, job_overrides, initial_job_idx)  # exits 2 on a refused point
            return self.inner.launch(job_overrides, initial_job_idx=initial_job_idx)
        problems = point_problems(self.composer, job_overrides, initial_job_idx)
        returns: List[Optional[JobReturn]] = [None] * len(job_overrides)
        i = 0
        while i < len(job_overrides):  # runs of valid points launch together, keeping their job numbers
            if problems[i]:
                err = PointRefused(f"sweep point #{initial_job_idx + i} ({' '.join(job_overrides[i])}) was not "
                                   "launched: " + "; ".join(problems[i]))
                returns[i] = JobReturn(overrides=list(job_overrides[i]), status=JobStatus.FAILED, _return_value=err)
                i += 1
                continue
            j = i
            while j < len(job_overrides) and not problems[j]:
                j += 1
            returns[i:j] = self.inner.launch(job_overrides[i:j], initial_job_idx=initial_job_idx + i)
            i = j
        return returns  # type: ignore[return-value]


def _wrap_launcher(holder: Any, hydra_context: HydraContext, config: DictConfig) -> None:
    if is_kit_config(config):
        tolerate = (OmegaConf.select(config, "hydra.sweeper.max_failure_rate") or 0) > 0
        holder.launcher = CheckedLauncher(holder.launcher, PointComposer(hydra_context, config), tolerate)


try:
    from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
except ImportError:  # not installed: kit_optuna exists to say what to install
    class OptunaMissing(Sweeper):
        def __init__(self, **_: Any):
            raise ImportError(NEEDS)

        def setup(self, **_: Any) -> None:  # pragma: no cover - never constructed
            raise ImportError(NEEDS)

        def sweep(self, arguments: List[str]) -> Any:  # pragma: no cover
            raise ImportError(NEEDS)

    # a plain dict node: a preset's sweeper keys (direction, params, sampler...) merge into it, and
    # instantiating it then raises with the install line
    ConfigStore.instance().store(group="hydra/sweeper", name="kit_optuna", provider="rlhf-kit",
                                 node={"_target_": "hydra_plugins.rlhf_kit.search.OptunaMissing"})
else:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

    @dataclass
    class KitOptunaSweeperConf(OptunaSweeperConf):
        _target_: str = "hydra_plugins.rlhf_kit.search.KitOptunaSweeper"

    class KitOptunaSweeper(OptunaSweeper):
        """Optuna's sweeper; each batch of trials is checked by the kit before it is launched."""

        def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
            super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
            _wrap_launcher(self.sweeper, hydra_context, config)

    ConfigStore.instance().store(group="hydra/sweeper", name="kit_optuna", node=KitOptunaSweeperConf,
                                 provider="rlhf-kit")
