"""Experiment tracking around the stages: the `logger=` group's sinks, fed from a stage's metrics.jsonl
while the stage runs, and the metric a search sweeper optimises (`optimized_metric`).

Every training stage already writes metrics.jsonl and tensorboard/ (logger=tensorboard, the default, is
exactly that). logger=wandb and logger=mlflow add one run per stage in those tools (grouped by run.name),
fed by a thread of the stage's rank-0 process that forwards each new metrics.jsonl row as it is written
(`<split>/<metric>` at the row's step): the stage packages know nothing of it, and a tracking failure
is logged, never a failed stage. `logger.offline=true` needs no server or account (wandb's offline mode,
to `wandb sync` later; a SQLite MLflow store, for `mlflow ui`). The packages are optional extras,
checked before anything runs.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from launcher.errors import suggest

log = logging.getLogger("launcher")
LOGGERS = {"tensorboard": None, "wandb": "wandb", "mlflow": "mlflow"}  # logger.name -> the package it needs


def config_problems(cfg: DictConfig, stages: Sequence[str]) -> List[str]:
    """logger= and optimized_metric, checked before anything runs."""
    out = []
    name = cfg.logger.name
    if name not in LOGGERS:
        out.append(f"logger.name={name!r} is not one of {list(LOGGERS)}.{suggest(str(name), LOGGERS)}")
    elif LOGGERS[name] and importlib.util.find_spec(LOGGERS[name]) is None:
        out.append(f"logger={name} needs the {LOGGERS[name]} package, which is not installed: "
                   f"pip install 'rlhf-kit[{name}]' (or logger=tensorboard, the default)")
    metric = cfg.optimized_metric
    if metric is not None:
        parts = str(metric).split("/")
        if len(parts) != 3 or not all(parts):
            out.append(f"optimized_metric={metric!r}: expected <stage>/<split>/<metric>, e.g. rm/val/loss")
        elif parts[0] not in stages:
            out.append(f"optimized_metric={metric!r}: stage {parts[0]} is not run (stage={','.join(stages)})")
    return out


def read_metric(run_dir: Path, name: str) -> float:
    """The last value of <stage>/<split>/<metric> in the run's <stage>/metrics.jsonl."""
    stage, split, key = name.split("/")
    path = Path(run_dir) / stage / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    rows = [r for r in rows if r.get("split") == split]
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    if not values:
        keys = sorted({k for r in rows for k in r} - {"step", "split", "time"})
        raise ValueError(f"optimized_metric={name}: no '{key}' in the '{split}' rows of {path}"
                         + (f" (it has: {', '.join(keys)})" if keys else ""))
    return float(values[-1])


class _WandbRun:
    def __init__(self, cfg: DictConfig, stage: str, save_dir: Path, name: str):
        import wandb

        lc = cfg.logger
        save_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=lc.project, name=name, group=cfg.run.name, job_type=stage, dir=str(save_dir),
                              mode="offline" if lc.offline else None, tags=list(lc.tags) or None,
                              config=_container(cfg, stage))
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")  # rows of several splits share a step

    def log(self, step: int, values: Dict[str, float], timestamp: float) -> None:
        self.run.log({"step": step, **values})

    def finish(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class _MlflowRun:
    def __init__(self, cfg: DictConfig, stage: str, save_dir: Path, name: str):
        from mlflow.tracking import MlflowClient

        lc = cfg.logger
        server = lc.tracking_uri if lc.tracking_uri and not lc.offline else None
        artifacts = None
        if server is None:  # a SQLite store (MLflow 3 retired the file store), its artifacts beside it, not in ./
            save_dir.mkdir(parents=True, exist_ok=True)
            artifacts = (save_dir / "mlflow-artifacts").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=server or f"sqlite:///{(save_dir / 'mlflow.db').resolve()}")
        exp = self.client.get_experiment_by_name(lc.project)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(lc.project, artifact_location=artifacts)
        tags = {"rlhf_kit.stage": stage, "rlhf_kit.run": cfg.run.name, **{t: "" for t in lc.tags}}
        self.run_id = self.client.create_run(exp_id, run_name=name, tags=tags).info.run_id
        self.client.log_text(self.run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")

    def log(self, step: int, values: Dict[str, float], timestamp: float) -> None:
        from mlflow.entities import Metric

        ms = int(timestamp * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ms, step) for k, v in values.items()])

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


SINKS = {"wandb": _WandbRun, "mlflow": _MlflowRun}


def _container(cfg: DictConfig, stage: str) -> Dict[str, Any]:
    keep = [k for k in (stage, "model", "data", "cluster") if k in cfg]
    return {k: OmegaConf.to_container(cfg[k], resolve=True) for k in keep}


class MetricsForwarder:
    """Forwards the rows a stage appends to its metrics.jsonl to a wandb or mlflow run, from a thread.
    The run is opened on the first row (a stage without metrics, prep, opens none)."""

    def __init__(self, cfg: DictConfig, stage: str, stage_dir: Path, interval_s: float = 2.0):
        self.cfg, self.stage, self.interval_s = cfg, stage, interval_s
        self.path = Path(stage_dir) / "metrics.jsonl"
        self.started = time.time() - 1.0  # rows of an earlier run of the stage are not this run's
        self.offset = 0
        self.sink: Optional[Any] = None
        self.failed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics-forwarder", daemon=True)

    def __enter__(self) -> "MetricsForwarder":
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()
        if self.sink is not None:
            with self._guard("closing"):
                self.sink.finish(ok=exc_type is None)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._drain()

    @contextlib.contextmanager
    def _guard(self, what: str):
        try:
            yield
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            if not self.failed:
                log.warning("logger=%s: %s failed, metrics stay in %s: %s", self.cfg.logger.name, what, self.path, e)
            self.failed = True

    def _drain(self) -> None:
        if self.failed or not self.path.exists():
            return
        with self.path.open("rb") as f:
            if f.seek(0, 2) < self.offset:  # rewritten (a resumed run truncated it): only rows from now on
                self.offset = f.tell()
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a row being written is taken next time
        self.offset += len(complete)
        for line in complete.decode().splitlines():
            row = json.loads(line) if line.strip() else {}
            if row.get("time", self.started) < self.started:
                continue
            values = {f"{row.get('split', 'train')}/{k}": float(v) for k, v in row.items()
                      if k not in ("step", "split", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}
            with self._guard("logging"):
                if self.sink is None:
                    lc = self.cfg.logger
                    save_dir = Path(lc.save_dir) if lc.save_dir else Path(self.cfg.run.dir)
                    name = lc.run_name or f"{self.cfg.run.name}-{self.stage}"
                    self.sink = SINKS[lc.name](self.cfg, self.stage, save_dir, name)
                self.sink.log(int(row.get("step", 0)), values, float(row.get("time", time.time())))
            if self.failed:
                return


def forward_metrics(cfg: DictConfig, stage: str, stage_dir: Path, rank: int):
    """The context a stage runs in: a MetricsForwarder on rank 0 for logger=wandb|mlflow, else nothing."""
    if rank != 0 or cfg.logger.name not in SINKS:
        return contextlib.nullcontext()
    return MetricsForwarder(cfg, stage, stage_dir)
