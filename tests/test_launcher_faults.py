"""Faults and hostile inputs the launcher is tested against (issue 18; README: "Faults the kit is tested
against"). Real launcher CLI, real subprocesses, real files; each test fails without its fix."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kit import ROOT, cli


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def launch(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "launcher" / "main.py"), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def wait_for(predicate, timeout: float = 120, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def stage_status(run_dir: Path, stage: str):
    try:
        return manifest(run_dir)["stages"].get(stage, {}).get("status")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_an_unchanged_second_run_skips_every_stage(tmp_path):
    """The fingerprint recorded while prep's outputs were pending equals the one computed once prep is
    recorded: the second run skips all three stages (it re-ran rm and ppo), and `updated` moves."""
    run = tmp_path / "run"
    r = cli("debug=fdr", f"run.dir={run}", timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    first = manifest(run)
    time.sleep(1.1)  # `updated` has a resolution of one second
    r = cli("debug=fdr", f"run.dir={run}", timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for stage in ("prep", "rm", "ppo"):
        assert f"stage {stage}: up to date" in r.stdout, r.stdout[-3000:]
    second = manifest(run)
    assert {s: e["fingerprint"] for s, e in second["stages"].items()} == \
        {s: e["fingerprint"] for s, e in first["stages"].items()}
    assert second["updated"] > first["updated"]
