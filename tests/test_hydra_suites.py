"""Hydra's own launcher and sweeper test suites (hydra-core's hydra/test_utils, as Hydra runs them on
its BasicSweeper in tests/test_basic_launcher.py) with `hydra/sweeper=kit`: the kit's sweeper must serve
any Hydra app that selects it, not only the kit, and keep BasicSweeper's jobs, batches and directories."""
import pytest
from pytest import mark, param

from hydra.core.singleton import Singleton
from hydra.test_utils.launcher_common_tests import (
    BatchedSweeperTestSuite,
    IntegrationTestSuite,
    LauncherTestSuite,
)
from hydra.version import VersionBase
from tests.kit import ROOT


@pytest.fixture(autouse=True)
def hydra_version_base_unspecified():
    """Each suite test starts as in Hydra's own session: no version_base chosen yet (1.1 defaults, such as
    chdir to the job's folder). The kit's own tests compose with version_base=None, a process-wide choice."""
    Singleton._instances.pop(VersionBase, None)
    yield
    Singleton._instances.pop(VersionBase, None)


@mark.parametrize("launcher_name, overrides", [("basic", ["hydra/sweeper=kit"])])
class TestKitSweeperLauncher(LauncherTestSuite):
    pass


@mark.parametrize("task_launcher_cfg, extra_flags", [
    param({}, ["-m", "hydra/launcher=basic", "hydra/sweeper=kit", "hydra/hydra_logging=disabled",
               "hydra/job_logging=disabled"], id="kit_sweeper_multirun"),
])
class TestKitSweeperIntegration(IntegrationTestSuite):
    pass


@mark.parametrize("launcher_name, overrides", [("basic", ["hydra/sweeper=kit", "hydra.sweeper.max_batch_size=2"])])
class TestKitSweeperWithBatching(BatchedSweeperTestSuite):
    pass


@mark.usefixtures("hydra_restore_singletons")
def test_the_suites_run_the_kit_sweeper(hydra_sweep_runner, tmpdir):
    """The suites above exercise this checkout's sweeper on an app that is not the kit."""
    import hydra_plugins.rlhf_kit.kit_sweeper as kit

    sweep = hydra_sweep_runner(calling_file=None, calling_module="hydra.test_utils.a_module", task_function=None,
                               config_path="configs", config_name="compose.yaml", temp_dir=tmpdir,
                               overrides=["hydra/sweeper=kit", "bar=1,2"])
    with sweep:
        assert [r.cfg.bar for r in sweep.returns[0]] == [1, 2]
        assert sweep.returns[0][0].hydra_cfg.hydra.sweeper._target_ == "hydra_plugins.rlhf_kit.kit_sweeper.KitSweeper"
    assert kit.__file__.startswith(str(ROOT)), kit.__file__
