"""Helpers for the tests that need the real Slurm of tests/slurm/start_slurm.sh."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

HOOKS = Path(__file__).resolve().parent / "hooks"
ROOT = HOOKS.parent.parent.parent  # the checkout
START = "sudo tests/slurm/start_slurm.sh   (stop: tests/slurm/stop_slurm.sh)"


def slurm_up() -> str:
    """'' when a controller answers and the node is usable, else why not."""
    if not shutil.which("sinfo"):
        return "Slurm is not installed"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    states = set(r.stdout.split())
    if r.returncode or not states & {"idle", "mixed", "allocated"}:
        return f"no usable Slurm node (sinfo: {r.stdout.strip() or r.stderr.strip()})"
    if subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True).returncode:
        return "Slurm runs without accounting (sacct fails); the tests need slurmdbd"
    return ""


def require_slurm() -> None:
    why = slurm_up()
    if not why:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but no Slurm cluster: {why}. .ci/run starts one with tests/slurm/start_slurm.sh",
                    pytrace=False)
    pytest.skip(f"{why}; start a throwaway one with: {START}")


def hook(mode: str, stage: str) -> list:
    """cluster.env.PYTHONPATH replaces the checkout's path in the batch script (as it does for local ranks),
    so it names the checkout too: with the hooks alone the job imports no kit, or another copy pip installed."""
    return [f"+cluster.env.PYTHONPATH={HOOKS}{os.pathsep}{ROOT}", f"+cluster.env.KIT_TEST_HOOK={mode}:{stage}"]


def manifest(run_dir: Path) -> dict:
    p = Path(run_dir) / "manifest.json"
    return json.loads(p.read_text()) if p.exists() else {"stages": {}}


def wait_for(predicate, timeout: float, what: str, poll: float = 0.3):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def job_field(job_id: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    kv = dict(w.split("=", 1) for w in out.split() if "=" in w)
    return kv.get(field, "")


def sacct_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True)
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
