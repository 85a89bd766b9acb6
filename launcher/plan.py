"""From a composed config to the jobs to run: per-stage configs, inputs wired from earlier stages
(this run, or recorded in the run's manifest), fingerprints, and which stages are up to date."""
from __future__ import annotations

import hashlib
import logging
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from launcher.errors import ConfigError
from launcher.schedules import check_stage
from launcher.manifest import DONE, Manifest, artifact_exists, artifact_paths
from launcher.stages import REGISTRY, shape_artifact
from launcher.inputs import checkpoint_problems
from launcher.validate import schema

log = logging.getLogger("launcher")
DEFERRED = "filled at run time from {producer}'s '{artifact}' artifact"


@dataclass
class StageJob:
    stage: str
    run_dir: Path
    cfg: DictConfig  # the stage's exact config (run.stage_dir set, known inputs filled)
    fingerprint: str
    up_to_date: bool = False
    deferred: Dict[str, str] = field(default_factory=dict)  # key -> note, for the dry-run render
    after: List[str] = field(default_factory=list)  # stages of this run whose artifacts it needs
    notes: List[str] = field(default_factory=list)  # what the stage will do (each schedule's shape)

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / self.stage

    @property
    def config_path(self) -> Path:
        return self.stage_dir / "config.yaml"

    def run_yaml(self) -> str:
        """The YAML written to <stage>/config.yaml before launch (deferred inputs still null)."""
        return OmegaConf.to_yaml(self.cfg, resolve=True)

    def yaml(self) -> str:
        text = OmegaConf.to_yaml(self.cfg, resolve=True)
        if self.deferred:
            notes = "".join(f"#   {k}: {v}\n" for k, v in self.deferred.items())
            text = f"# inputs produced by earlier stages of this run:\n{notes}" + text
        if self.notes:
            text = "# learning-rate schedules of this run:\n" + "".join(f"#   {n}\n" for n in self.notes) + text
        return text


NOT_AVAILABLE = "NOT AVAILABLE"  # a deferred input no producer will fill (a dry run's note)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_stage_config(path: Path) -> DictConfig:
    """A stage's config.yaml, typed against the schema again (the runner's side)."""
    return OmegaConf.merge(schema(), OmegaConf.load(path))  # merge copies the cached schema


def resolve_inputs(cfg: DictConfig, stage: str, manifest: Manifest, this_run: List[str],
                   dry_run: bool = False, base: Optional[Manifest] = None) -> tuple[Dict[str, str], List[str], List[str]]:
    """Fill the stage's null input keys from producers' recorded artifacts.

    Returns (deferred key -> note, producers in this run it waits for, problems). A producer in
    `this_run` has not run yet: its inputs are deferred to run time (the runner calls this again).
    `base`: a second manifest to look in (a sweep point's base run, where prep ran once for all points).
    """
    deferred: Dict[str, str] = {}
    after: List[str] = []
    problems: List[str] = []
    recorded = manifest.read()["stages"]
    if base is not None and base.path != manifest.path:
        recorded = {**base.read()["stages"], **{k: v for k, v in recorded.items() if v.get("status") in DONE}}
    for inp in REGISTRY[stage].inputs:
        current = OmegaConf.select(cfg, inp.key)
        if _unset(current):
            current = None  # an all-empty data_prefix means "from the prep stage"
        if current is not None and not inp.always:
            continue  # explicit wins
        if inp.producer in this_run:
            deferred[inp.key] = DEFERRED.format(producer=inp.producer, artifact=inp.artifact)
            after.append(inp.producer)
            continue
        entry = recorded.get(inp.producer, {})
        value = entry.get("artifacts", {}).get(inp.artifact)
        if entry.get("status") in DONE and value and all(artifact_exists(p) for p in artifact_paths(value)):
            OmegaConf.update(cfg, inp.key, shape_artifact(value, inp.shape), merge=False)
            if inp.key == "data.tokenizer.model":
                cfg.data.tokenizer.library = None  # the artifact's extension says which library
        elif current is None and inp.required:
            msg = (f"stage {stage} needs '{inp.key}': set it, or run stage {inp.producer} first "
                   f"(in this run: stage={inp.producer},{stage}; no {inp.producer} artifacts are recorded "
                   f"in {manifest.path})")
            (deferred.__setitem__(inp.key, f"{NOT_AVAILABLE}: " + msg) if dry_run else problems.append(msg))
    return deferred, sorted(set(after)), problems


def nothing_to_evaluate(cfg: DictConfig, deferred: Dict[str, str]) -> List[str]:
    """stage eval with the reward model's eval off and no policy (none given, none recorded, none produced by
    an earlier stage of this run) would do nothing: said before anything runs or is submitted."""
    from evaluation.config import nothing_to_evaluate as missing

    key = "eval.policy.restore_from_path"
    known = bool(cfg.eval.policy.restore_from_path) or not deferred.get(key, NOT_AVAILABLE).startswith(NOT_AVAILABLE)
    msg = missing(cfg.eval.rm.enabled, cfg.eval.policy.enabled, known)
    return [msg] if msg else []


def _explicit_inputs_exist(cfg: DictConfig, stage: str) -> List[str]:
    problems = []
    for inp in REGISTRY[stage].inputs:
        value = OmegaConf.select(cfg, inp.key)
        if _unset(value) or inp.always:
            continue
        value = _plain(value)
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for split, paths in items:
            key = f"{inp.key}.{split}" if split else inp.key
            for path in artifact_paths(paths):
                if not str(path).startswith("pkg:") and not artifact_exists(path):
                    hint = " (a data prefix needs <prefix>.bin and <prefix>.idx)" if inp.key.endswith("data_prefix") \
                        and not str(path).endswith(".jsonl") else ""
                    problems.append(f"{key}: {path} does not exist{hint}")
                elif inp.artifact == "nemo" and not str(path).startswith("pkg:"):
                    problems += checkpoint_problems(key, path)
    return problems


def make_plan(cfg: DictConfig, stages: List[str], run_dir: Path, force: bool, dry_run: bool,
              base_dir: Optional[Path] = None) -> List[StageJob]:
    """`base_dir`: for a sweep point, the base run whose recorded artifacts the point may use."""
    manifest = Manifest(run_dir)
    base = Manifest(base_dir) if base_dir is not None else None
    recorded = manifest.read()["stages"]
    jobs: List[StageJob] = []
    fingerprints: Dict[str, str] = {}
    force_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{socket.gethostname()}-{os.getpid()}" if force else None
    problems: List[str] = []
    for i, stage in enumerate(stages):
        scfg = OmegaConf.merge(schema(), cfg)  # a private, typed copy (merge copies the schema)
        scfg.stage = stage
        scfg.run.dir = str(run_dir)
        scfg.run.stage_dir = str(run_dir / stage)
        if force_id:
            scfg.run.force_id = force_id  # the stage trains from step 0, whatever checkpoints it finds
        if REGISTRY[stage].trainer and scfg[stage].exp_manager.explicit_log_dir is None:
            scfg[stage].exp_manager.explicit_log_dir = str(run_dir / stage)
        # earlier stages of this run that are up to date hand over their recorded artifacts now
        pending = [s for s in stages[:i] if not any(j.stage == s and j.up_to_date for j in jobs)]
        spec = REGISTRY[stage]
        # the fingerprint reads the config as the user gave it, before inputs are filled: whether an
        # input was filled now or will be at run time must not change it (else the next run re-runs)
        given = {s: OmegaConf.to_container(scfg[s], resolve=True) for s in spec.sections}
        given_inputs = {inp.key: _plain(OmegaConf.select(scfg, inp.key)) for inp in spec.inputs}
        deferred, after, errs = resolve_inputs(scfg, stage, manifest, pending, dry_run, base)
        problems += errs
        for msg in _explicit_inputs_exist(scfg, stage):
            (warn(msg) if dry_run else problems.append(msg))
        errs, notes = check_stage(scfg, stage, deferred)
        problems += errs
        if stage == "eval":
            problems += nothing_to_evaluate(scfg, deferred)
        known = {**(base.read()["stages"] if base else {}), **recorded}
        inputs, upstream = {}, {}
        for inp in spec.inputs:
            if inp.key in deferred or _plain(OmegaConf.select(scfg, inp.key)) != given_inputs[inp.key]:
                inputs[inp.key] = f"from {inp.producer}"  # its identity: the producer's fingerprint
                upstream[inp.producer] = fingerprints.get(inp.producer) or known.get(inp.producer, {}).get("fingerprint")
            else:
                inputs[inp.key] = identity(given_inputs[inp.key])
        fp = _digest({"sections": given, "inputs": inputs, "upstream": upstream})
        fingerprints[stage] = fp
        up = not force and not dry_run and manifest.is_up_to_date(stage, fp) and not after
        jobs.append(StageJob(stage, run_dir, scfg, fp, up_to_date=up, deferred=deferred, after=after, notes=notes))
    if problems:
        raise ConfigError(problems)
    return jobs


def identity(value: Any) -> Any:
    """An input as given, with each existing file's size and modification time: a file replaced
    under the same name is a new input."""
    def one(path: str):
        files = [path] if os.path.isfile(path) else [path + ".bin", path + ".idx"]
        stats = [os.stat(f) for f in files if os.path.isfile(f)]
        return [path] + [[st.st_size, st.st_mtime_ns] for st in stats] if stats else path

    if isinstance(value, str):
        return one(value)
    if isinstance(value, dict):
        return {k: identity(v) for k, v in value.items()}
    if isinstance(value, list):
        return [identity(v) for v in value]
    return value


def warn(msg: str) -> None:
    log.warning("dry run: %s (an error when run for real)", msg)


def _unset(value: Any) -> bool:
    """None, or a data_prefix whose splits are all empty."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    if isinstance(value, dict):
        return not any(value.values())
    return value is None


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def find_job(jobs: List[StageJob], stage: str) -> Optional[StageJob]:
    return next((j for j in jobs if j.stage == stage), None)
