"""hydra/sweeper=kit keeps Hydra's sweep semantics: each point is composed and checked as its job will
see it (its `${hydra:...}` values, its search path's groups, `hydra.*` keys), through the real CLI and
the real Hydra config loader."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf, open_dict, read_write

from tests.kit import CONF, cli, compose_cfg


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_the_kit_sweeper_composes_each_point_as_hydra_does():
    """Composed once per group choice, each point's key=value overrides applied to a copy
    (hydra_plugins/rlhf_kit/points.py): every point's config, its hydra node included, must equal
    Hydra's full composition of it as BasicLauncher makes it (job.num, job.id)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import HydraContext, RunMode

    compose_cfg([])  # registers the schema; Hydra's plugin scan (re-)executes the plugin modules: import after it
    from hydra_plugins.rlhf_kit.kit_sweeper import KitSweeper
    from hydra_plugins.rlhf_kit.points import PointComposer

    GlobalHydra.instance().clear()
    args = ["stage=rm", "model=tiny,gpt_2b", "model.restore_from_path=/x.nemo", "rm.model.optim.lr=1e-6,2e-6",
            "+cluster.env.A=1", "rm.model.optim={sched:{name:constant}}", "experiment=quickstart"]
    params = ["hydra.job.name=a,b"]  # what hydra.sweeper.params may sweep (not the command line)
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration("config", overrides=args, run_mode=RunMode.MULTIRUN)
        points = KitSweeper.split_arguments(OverridesParser.create().parse_overrides(params + args), None)[0]
        assert len(points) == 8
        composer = PointComposer(HydraContext(config_loader=loader, callbacks=None), master)
        configs = list(composer.configs(points))
        for num, (point, cfg) in enumerate(zip(points, configs)):
            full = loader.load_sweep_config(master, list(point))
            with read_write(full.hydra), open_dict(full.hydra):
                full.hydra.job.id = full.hydra.job.num = num  # what BasicLauncher sets
            assert OmegaConf.to_yaml(cfg) == OmegaConf.to_yaml(full), point
            assert composer.needs_hydra(point)  # it sets hydra.job.name
            assert cfg.rm.model.optim.sched.name == "constant" and cfg.cluster.env.A == "1"
        assert [c.hydra.job.name for c in configs[::4]] == ["a", "b"]
        assert len({c.hydra.job.override_dirname for c in configs}) == 4  # hydra.* keys are not in it
        assert {c.model.name for c in configs} == {"tiny", "gpt_2b"}
        assert len(composer._composed) == 2, "one composition per distinct group choice"
        # points that set no hydra.* key and use no ${hydra:...}: only their job config is copied
        for point in KitSweeper.split_arguments(OverridesParser.create().parse_overrides(args), None)[0]:
            assert not composer.needs_hydra(point)
            full = loader.load_sweep_config(master, list(point))
            with open_dict(full):
                del full["hydra"]
            assert OmegaConf.to_yaml(composer.task_config(point)) == OmegaConf.to_yaml(full), point


def test_hydra_resolver_values_in_a_sweep(tmp_path):
    """`${hydra:...}` in a sweep: the issue's command exits 0, as under BasicSweeper."""
    r = cli("-m", "stage=prep", "data.source=local", "data.path=${hydra:runtime.cwd}/../data/hh.jsonl",
            "cluster.nodes=1,1", "dry_run=true", f"run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/sweep")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "HydraConfig was not set" not in r.stderr
    for num in (0, 1):
        cfg = OmegaConf.load(tmp_path / "sweep" / str(num) / "dry_run" / "prep" / "config.yaml")
        assert cfg.data.path.endswith("/../data/hh.jsonl") and "${" not in cfg.data.path


def test_each_point_is_checked_with_its_own_hydra_values(tmp_path):
    """${hydra:job.num} and ${hydra:runtime.choices.model} are the point's own when the kit checks it:
    only the point whose file is missing is refused, before anything runs."""
    data = tmp_path / "data"
    write(data / "0.jsonl", "{}\n")
    write(data / "tiny.jsonl", "{}\n")
    sweep = tmp_path / "sweep"
    r = cli("-m", "stage=prep", "data.source=local", f"data.path={data}/" + "${hydra:job.num}.jsonl",
            "data.max_pairs=10,20", f"run.dir={tmp_path}/run", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"data.path={data}/1.jsonl: no such file or directory (sweep point #1: data.max_pairs=20)" in r.stderr
    assert "#0" not in r.stderr and not sweep.exists()

    r = cli("-m", "stage=prep", "data.source=local", f"data.path={data}/" + "${hydra:runtime.choices.model}.jsonl",
            "model=tiny,smollm2_135m", f"run.dir={tmp_path}/run", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"data.path={data}/smollm2_135m.jsonl: no such file or directory (sweep point #1: model=smollm2_135m)" \
        in r.stderr
    assert "tiny.jsonl" not in r.stderr and not sweep.exists()


def test_groups_from_the_search_path_are_groups_in_the_sweep_check(tmp_path):
    """`+preset=...` from hydra.searchpath is composed into each point, not taken for a plain key: the
    preset's global_batch_size=36 makes micro_batch_size=12 valid and the default micro batch (8) not."""
    extra = tmp_path / "extra"
    write(extra / "preset" / "gbs36.yaml", "# @package _global_\nrm:\n  model:\n    global_batch_size: 36\n")
    common = ["-m", "stage=rm", "dry_run=true", f"hydra.searchpath=[file://{extra}]", "+preset=gbs36",
              "rm.model.optim.lr=1e-3,2e-3", f"run.dir={tmp_path}/run"]
    r = cli(*common, "rm.model.micro_batch_size=12", f"hydra.sweep.dir={tmp_path}/ok")
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = OmegaConf.load(tmp_path / "ok" / "1" / "dry_run" / "rm" / "config.yaml")
    assert cfg.rm.model.global_batch_size == 36 and "preset" not in cfg

    r = cli(*common, f"hydra.sweep.dir={tmp_path}/bad")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "rm.model.global_batch_size=36 is not divisible by micro_batch_size=8" in r.stderr
    assert "every sweep point" in r.stderr and not (tmp_path / "bad").exists()


def test_hydra_keys_in_the_sweepers_params(tmp_path):
    """hydra.sweeper.params may sweep hydra.* keys (here hydra.job.name), as under BasicSweeper, and a
    point's config sees its own value through ${hydra:job.name}."""
    extra = tmp_path / "extra"
    write(extra / "sweeps" / "names.yaml", "# @package _global_\nhydra:\n  sweeper:\n    params:\n"
          "      hydra.job.name: a,b\n      rm.model.optim.lr: 1e-3,2e-3\n")
    sweep = tmp_path / "sweep"
    r = cli("-m", "stage=rm", "dry_run=true", f"hydra.searchpath=[file://{extra}]", "+sweeps=names",
            "run.name=${hydra:job.name}", f"run.dir={tmp_path}/run", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-3000:]
    names = [OmegaConf.load(sweep / str(n) / "dry_run" / "rm" / "config.yaml").run.name for n in range(4)]
    assert names == ["a", "a", "b", "b"]


def test_every_points_launch_line_is_printed(tmp_path):
    r = cli("-m", "stage=rm", "dry_run=true", "rm.model.optim.lr=1e-3,2e-3", f"run.dir={tmp_path}/run",
            f"hydra.sweep.dir={tmp_path}/sweep")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[HYDRA] Launching 2 jobs locally" in r.stdout
    assert "#0 : stage=rm dry_run=True" in r.stdout and "#1 : stage=rm dry_run=True" in r.stdout


def test_a_preset_may_choose_another_sweeper(tmp_path):
    """conf/config.yaml selects the kit's sweeper (conf/hydra/kit.yaml) before its preset groups, so a
    preset's own `override /hydra/sweeper` wins, as in lightning-hydra-template's hparams_search presets
    (Hydra expands a defaults list from its end and keeps the first override of a group it meets)."""
    extra = tmp_path / "extra"
    preset = "# @package _global_\ndefaults:\n  - override /hydra/sweeper: basic\n"
    for group in ("hparams_search", "experiment"):
        write(extra / group / "basic.yaml", preset)
    write(tmp_path / "mine" / "local" / "default.yaml", preset)
    base = ["--cfg", "hydra", f"hydra.searchpath=[file://{extra}]"]
    assert OmegaConf.create(cli(*base).stdout).hydra.sweeper._target_.endswith("KitSweeper")
    for args in (base + ["hparams_search=basic"], base + ["experiment=basic"],
                 ["--cfg", "hydra", f"hydra.searchpath=[file://{tmp_path}/mine]"]):  # a local/default.yaml
        r = cli(*args)
        assert r.returncode == 0, r.stderr
        assert OmegaConf.create(r.stdout).hydra.sweeper._target_.endswith("BasicSweeper"), args


def test_a_plain_basic_sweeper_gets_the_kits_check_of_every_point(tmp_path):
    """`hydra/sweeper=basic` launched point #0 before finding point #1 bad; it now runs as the kit's."""
    from tests.kit import cli

    sweep = tmp_path / "sweep"
    r = cli("-m", "hydra/sweeper=basic", "stage=rm", "rm.model.global_batch_size=32,36", f"run.dir={tmp_path}/run",
            f"hydra.sweep.dir={sweep}")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "BasicSweeper runs as the kit's KitSweeper" in r.stdout
    assert "sweep point #1: rm.model.global_batch_size=36" in r.stderr
    assert not sweep.exists() and not (tmp_path / "run").exists()
