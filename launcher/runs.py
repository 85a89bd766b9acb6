"""Look at and stop runs that were submitted to Slurm (or run locally), from their manifests.

    python -m launcher.runs status RUN_DIR     # each stage: status, job, Slurm state, artifacts or error
    python -m launcher.runs cancel RUN_DIR     # cancel the run's queued and running jobs

RUN_DIR may also be a sweep directory (hydra multirun): every point in it is listed or cancelled.
`status` also settles stages whose Slurm job ended without the stage recording a result (killed, out
of memory, node failure, cancelled): they are recorded as failed or cancelled, with the reason.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import shutil
import sys
from pathlib import Path
from typing import Dict, List

from launcher.manifest import Manifest, now

SWEEP_RESULTS = "sweep_results.jsonl"


def run_dirs(path: Path) -> List[Path]:
    """The run itself, or the points of a sweep (folders below it holding a manifest)."""
    if (path / "manifest.json").exists():
        return [path]
    points = [p.parent for p in path.glob("*/manifest.json")]
    return sorted(points, key=lambda p: (len(p.name), p.name))


def _slurm_ids(manifest: Manifest) -> Dict[str, str]:
    return {name: e["job_ids"][-1] for name, e in manifest.read()["stages"].items()
            if e.get("executor") == "slurm" and e.get("job_ids")}


def lock_holder(run_dir: Path) -> Dict:
    """Who holds the run's launch lock (launcher/runlock.py): {pid, host, since, command}, or {}."""
    from launcher.runlock import LOCK_NAME

    try:
        text = (Path(run_dir) / LOCK_NAME).read_text().strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


def live_slurm_jobs(run_dir: Path) -> Dict[str, str]:
    """{stage: job id} of the run's stages whose Slurm job is still queued or running."""
    ids = {s: j for s, j in _slurm_ids(Manifest(run_dir)).items()
           if Manifest(run_dir).stage(s).get("status") in ("pending", "running")}
    if not ids or shutil.which("squeue") is None:
        return {}
    from launcher import slurm

    infos = slurm.job_info(list(ids.values()))
    return {s: j for s, j in ids.items() if j in infos and not slurm.is_terminal(infos[j]["State"])}


def status(path: Path, out=sys.stdout) -> int:
    dirs = run_dirs(path)
    if not dirs:
        print(f"no manifest.json in {path} (nor in its subfolders): not a run directory", file=sys.stderr)
        return 2
    from launcher import slurm

    ids = {d: _slurm_ids(Manifest(d)) for d in dirs}
    all_ids = [j for m in ids.values() for j in m.values()]
    infos = slurm.job_info(all_ids) if all_ids else {}
    worst = 0
    for d in dirs:
        manifest = Manifest(d)
        print(f"run {d}", file=out)
        for stage, entry in manifest.read()["stages"].items():
            jid = ids[d].get(stage)
            info = infos.get(jid) if jid else None
            if info:
                entry = slurm.reconcile(manifest, stage, info)
            if entry.get("executor") == "local":
                where = "local (pid)" if entry.get("status") in ("pending", "running") else "local"
            else:
                where = "slurm " + (f"{info['State']} {info['Elapsed']}" if info else
                                    "-" if not jid else "not known to Slurm")
            detail = entry.get("error") or entry.get("requeue_note") or ", ".join(
                f"{k}={v}" for k, v in entry.get("artifacts", {}).items() if isinstance(v, str))
            print(f"  {stage:5s} {entry.get('status', '?'):9s} job {jid or ','.join(entry.get('job_ids', [])) or '-':>8s}"
                  f"  {where:30s} {detail}", file=out)
            if entry.get("status") == "failed":
                worst = 1
    return worst


def cancel(path: Path, out=sys.stdout) -> int:
    dirs = run_dirs(path)
    if not dirs:
        print(f"no manifest.json in {path} (nor in its subfolders): not a run directory", file=sys.stderr)
        return 2
    from launcher import slurm

    for d in dirs:
        manifest = Manifest(d)
        live = {s: e for s, e in manifest.read()["stages"].items() if e.get("status") in ("pending", "running")}
        ids = {s: j for s, j in _slurm_ids(manifest).items() if s in live}
        local = [s for s in live if live[s].get("executor") == "local"]
        if ids:
            slurm.cancel(list(ids.values()))
            for stage, jid in ids.items():
                manifest.update_stage(stage, status="cancelled", finished=now(), error=f"cancelled (Slurm job {jid})")
            print(f"{d}: cancelled " + ", ".join(f"{s} (job {j})" for s, j in ids.items()), file=out)
        holder = lock_holder(d)
        for stage in local:
            how = (f"kill {holder['pid']} (on {holder.get('host')}; the launcher hands SIGTERM to the stage, which "
                   "is recorded as cancelled)") if holder.get("pid") else "Ctrl-C in its terminal"
            print(f"{d}: stage {stage} runs locally: stop it with {how}", file=out)
        if not live:
            print(f"{d}: nothing to cancel", file=out)
    return 0


def record_sweep_point(sweep_dir: Path, num: int, overrides: List[str], run_dir: Path, code: int, **extra) -> None:
    """One line per finished sweep point in <sweep dir>/sweep_results.jsonl: its overrides, exit code, and
    each stage's status and artifacts (the sweep's results, collected in one place); `extra`: more fields
    (the optimized_metric's value)."""
    stages = Manifest(run_dir).read()["stages"]
    line = {"num": num, "overrides": list(overrides), "run_dir": str(run_dir), "exit_code": code, "finished": now(),
            "stages": {s: {"status": e.get("status"), "artifacts": e.get("artifacts", {}), "error": e.get("error")}
                       for s, e in stages.items()}, **extra}
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / ".sweep_results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(sweep_dir / SWEEP_RESULTS, "a") as f:
            f.write(json.dumps(line) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.runs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["status", "cancel"])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    with contextlib.suppress(BrokenPipeError):
        return {"status": status, "cancel": cancel}[args.command](args.run_dir.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
