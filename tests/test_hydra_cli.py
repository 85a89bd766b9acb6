"""The kit's command line as a Hydra user knows it: tab completion, groups from the search path, stage
lists under -m, hydra.job.chdir, hydra.run.dir. Real CLI, real Hydra."""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from tests.kit import cli


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_tab_completion_answers_hydras_installed_script():
    """Hydra's bash script (`--shell-completion install=bash`) runs `-sc query=bash` on every TAB."""
    r = cli("-sc", "query=bash", env={"COMP_LINE": "python launcher/main.py model=", "COMP_POINT": "30"})
    assert r.returncode == 0, r.stderr
    assert set(r.stdout.split()) == {"model=gpt_2b", "model=smollm2_135m", "model=tiny"}
    r = cli("-sc", "query=bash", env={"COMP_LINE": "python launcher/main.py rm.model.op"})
    assert r.returncode == 0 and r.stdout.split() == ["rm.model.optim."], r.stdout + r.stderr


def test_the_precheck_knows_groups_from_the_search_path(tmp_path):
    """A primary config from --config-dir with a group of its own: `preset=b` is that group's choice,
    not an unknown key; a typo is still refused before Hydra runs."""
    user = tmp_path / "user"
    write(user / "mine.yaml", "defaults:\n  - config\n  - preset: a\n  - _self_\n")
    for name, gbs in (("a", 40), ("b", 48)):
        write(user / "preset" / f"{name}.yaml", f"# @package _global_\nrm:\n  model:\n    global_batch_size: {gbs}\n")
    r = cli("-cd", str(user), "-cn", "mine", "preset=b", "--cfg", "job")
    assert r.returncode == 0, r.stderr
    assert OmegaConf.create(r.stdout).rm.model.global_batch_size == 48
    r = cli("-cd", str(user), "-cn", "mine", "presett=b", "--cfg", "job")
    assert r.returncode == 2 and "unknown key 'presett'" in r.stderr


def test_a_stage_list_means_the_same_under_multirun(tmp_path):
    """`stage=rm,ppo` runs rm then ppo in each point, with -m as with hydra.mode=MULTIRUN."""
    for mode, flag in (("m", "-m"), ("mode", "hydra.mode=MULTIRUN")):
        sweep = tmp_path / mode
        r = cli(flag, "stage=rm,ppo", "dry_run=true", "rm.model.optim.lr=1e-3,2e-3", f"run.dir={tmp_path}/run",
                f"hydra.sweep.dir={sweep}")
        assert r.returncode == 0, r.stderr[-3000:]
        assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"], mode
        for point in ("0", "1"):
            assert sorted(p.name for p in (sweep / point / "dry_run").iterdir()) == ["ppo", "rm"], (mode, point)


def test_hydra_job_chdir_keeps_the_base_run(tmp_path):
    """Under hydra.job.chdir=true a point runs in its own folder; a relative run.dir still names the base
    run where prep ran (relative to where the command was started), so the points find its data."""
    assert cli("stage=prep", "run.dir=base", cwd=tmp_path).returncode == 0
    prep = json.loads((tmp_path / "base" / "manifest.json").read_text())["stages"]["prep"]["artifacts"]
    r = cli("-m", "stage=rm", "dry_run=true", "hydra.job.chdir=true", "run.dir=base", "rm.model.optim.lr=1e-3,2e-3",
            "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "NOT AVAILABLE" not in r.stdout
    for point in ("0", "1"):
        cfg = OmegaConf.load(tmp_path / "sweep" / point / "dry_run" / "rm" / "config.yaml")
        assert list(cfg.rm.model.data.data_prefix.train) == [prep["data_prefix"]["train"]]


def test_hydra_run_dir_is_refused_with_a_pointer_to_run_dir(tmp_path):
    r = cli("stage=rm", "dry_run=true", "hydra.run.dir=out", cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "hydra.run.dir=out: the kit places a run with run.dir (run.dir=out)" in r.stderr
    assert not (tmp_path / "out").exists() and "Traceback" not in r.stderr
    extra = write(tmp_path / "extra" / "where" / "out2.yaml", "# @package _global_\nhydra:\n  run:\n    dir: out2\n")
    r = cli("stage=rm", "dry_run=true", f"hydra.searchpath=[file://{extra.parent.parent}]", "+where=out2",
            cwd=tmp_path)
    assert r.returncode == 2 and "hydra.run.dir=out2: the kit places a run with run.dir" in r.stderr, r.stderr
