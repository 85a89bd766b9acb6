"""rlhf-kit's entry point: compose (Hydra), validate, plan, then run or submit.

    python launcher/main.py [stage=prep|rm|ppo|all] [dry_run=true] [group=option ...] [key=value ...]
"""
from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path
from typing import List, Optional

if __package__ in (None, ""):  # `python launcher/main.py` from a checkout: make the packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from launcher.cli import absolute, kit_argv, precheck, run_dir_problems
from launcher.errors import ConfigError
from launcher.executors import make_executor
from launcher.manifest import Manifest, atomic_write_text
from launcher.plan import make_plan
from launcher.runlock import RunLock
from launcher.tracking import read_metric
from launcher.validate import request_problems, schema

log = logging.getLogger("launcher")
ConfigStore.instance().store(name="kit_schema", node=schema())  # KitConfig, built once for both uses
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _run_dir(cfg: DictConfig) -> Path:
    hc = HydraConfig.get() if HydraConfig.initialized() else None
    if hc is not None and hc.mode == RunMode.MULTIRUN:
        return Path(hc.runtime.output_dir).resolve()  # each sweep point gets its own run folder
    return absolute(cfg.run.dir)


# problems the command line's pre-check found in arguments it took out (reported with validation's)
PRECHECK_PROBLEMS: List[str] = []


def launch(cfg: DictConfig) -> int:
    """Validate, plan and run (or render) the selected stages. Returns an exit code."""
    stages, problems = request_problems(cfg)
    problems = PRECHECK_PROBLEMS + problems + run_dir_problems()
    run_dir = _run_dir(cfg)
    base_dir = absolute(cfg.run.dir)  # a sweep point may use what its base run recorded (prep, once)
    jobs = []
    stamp = _manifest_stamp(run_dir)
    if stages:
        try:  # planning finds what validation cannot (inputs, schedules): reported with the rest
            jobs = make_plan(cfg, stages, run_dir, force=cfg.force, dry_run=cfg.dry_run,
                             base_dir=base_dir if base_dir != run_dir else None)
        except ConfigError as e:
            problems += [p for p in e.problems if p not in problems]
        except Exception:  # noqa: BLE001 - planning a config already refused: its problems say why
            if not problems:
                raise
    if problems:
        raise ConfigError(problems)
    executor = make_executor(cfg.cluster)
    if executor.name == "slurm" and _in_sweep_job():
        from launcher.executors import LocalExecutor  # a sweep point already is a Slurm job: no nested submission

        log.info("sweep point inside Slurm job %s: running the stages in this allocation", os.environ["SLURM_JOB_ID"])
        executor = LocalExecutor(cfg.cluster)
    if cfg.dry_run:
        return _dry_run(jobs, executor, run_dir)
    if executor.name == "slurm":
        executor.check_submittable()
    with RunLock(run_dir) as lock:  # one launch per run directory: a second one is refused here
        if _manifest_stamp(run_dir) != stamp:  # the run changed while this launch was planning it
            jobs = make_plan(cfg, stages, run_dir, force=cfg.force, dry_run=False,
                             base_dir=base_dir if base_dir != run_dir else None)
        _refuse_live_slurm_jobs(run_dir)
        executor.inherit_fds = [lock.fd]
        return _execute(jobs, executor, run_dir)


def _manifest_stamp(run_dir: Path):
    try:
        return Manifest(run_dir).path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def _refuse_live_slurm_jobs(run_dir: Path) -> None:
    """A run submitted to Slurm holds no lock once submitted: its queued or running jobs say it is live."""
    from launcher.runs import live_slurm_jobs

    live = live_slurm_jobs(run_dir)
    if live:
        raise ConfigError([f"run.dir={run_dir}: this run's Slurm jobs are still queued or running ("
                           + ", ".join(f"{s}: job {j}" for s, j in live.items()) + ")",
                           f"wait for them, or cancel them: python -m launcher.runs cancel {shlex.quote(str(run_dir))}"])


def _execute(jobs, executor, run_dir: Path) -> int:
    manifest = Manifest(run_dir)
    manifest.record_command()
    todo = []
    for job in jobs:
        for note in job.notes:
            log.info("stage %s: %s", job.stage, note)
        if job.up_to_date:
            log.info("stage %s: up to date (recorded artifacts exist, same config); skipping. force=true re-runs it",
                     job.stage)
            manifest.update_stage(job.stage, status="skipped")
        else:
            todo.append(job)
    if not todo:
        log.info("nothing to do in %s", run_dir)
        return 0
    code = executor.run(todo, manifest)
    log.info("run directory: %s", run_dir)
    return code


def _in_sweep_job() -> bool:
    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        return False
    from launcher.slurm import inside_submitit_job

    return inside_submitit_job()


def _record_sweep_point(cfg: DictConfig, code: int, value: Optional[float] = None) -> None:
    from launcher.runs import record_sweep_point

    hc = HydraConfig.get()
    extra = {"optimized_metric": {cfg.optimized_metric: value}} if cfg.optimized_metric else {}
    record_sweep_point(absolute(hc.sweep.dir), hc.job.num, list(hc.overrides.task), _run_dir(cfg), code, **extra)


def _dry_run(jobs, executor, run_dir: Path) -> int:
    out = run_dir / "dry_run"
    for job in jobs:
        text, script = job.yaml(), executor.render(job)
        print(f"# ===== stage {job.stage}: {job.config_path} =====")
        print(text)
        print(f"# ===== stage {job.stage}: launch ({executor.name}) =====")
        print(script)
        atomic_write_text(out / job.stage / "config.yaml", text)
        atomic_write_text(out / job.stage / ("submit.sbatch" if executor.name == "slurm" else "launch.sh"), script)
    print(f"# dry run: nothing was run; the above is also in {out}")
    return 0


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        code = launch(cfg)
    except ConfigError as e:
        if multirun:
            _record_sweep_point(cfg, 2)
            raise
        print(f"error: {e.render()}", file=sys.stderr)
        sys.exit(2)
    value = None
    if not code and cfg.optimized_metric and not cfg.dry_run:
        try:
            value = read_metric(_run_dir(cfg), cfg.optimized_metric)  # what a search sweeper optimises
        except ValueError as e:
            if multirun:
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        log.info("optimized_metric %s = %s", cfg.optimized_metric, value)
    if multirun and not cfg.dry_run:
        _record_sweep_point(cfg, code, value)
    if code and not multirun:
        sys.exit(code)
    if code:
        raise RuntimeError(f"run failed with exit code {code}: see {_run_dir(cfg)}")
    return code if value is None else value


def main() -> None:
    sys.argv[1:] = kit_argv(sys.argv[1:])
    try:
        argv = sys.argv[1:]
        PRECHECK_PROBLEMS[:] = precheck(argv)  # may take the arguments at fault out of argv
        sys.argv[1:] = argv
    except ConfigError as e:
        print(f"error: {e.render()}", file=sys.stderr)
        sys.exit(2)
    hydra_main()


if __name__ == "__main__":
    main()
