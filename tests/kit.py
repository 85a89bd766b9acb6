"""Helpers shared by the launcher tests: compose the real config tree, run the real CLI."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import List, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra

from launcher.config import KitConfig

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
SHARED = ROOT.parent / "shared"
HH_TEST = SHARED / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
CLUSTERS = sorted(p.stem for p in (CONF / "cluster").glob("*.yaml"))


def compose_cfg(overrides: Optional[List[str]] = None):
    ConfigStore.instance().store(name="kit_schema", node=KitConfig)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("config", overrides=list(overrides or []))


def cli(*args: str, cwd: Path = ROOT, timeout: float = 600, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """The real command line: python launcher/main.py ARGS."""
    return subprocess.run([sys.executable, str(ROOT / "launcher" / "main.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def preset_overrides(preset: str, tmp: Path) -> List[str]:
    """Values a preset leaves to the user (`???`), filled with real local files."""
    fake_nemo = tmp / "GPT-2B-001_bf16_tp1.nemo"  # a tar, as validation checks; planning reads no member
    with tarfile.open(fake_nemo, "w") as t:
        t.addfile(tarfile.TarInfo("model_config.yaml"))
    return {
        "gpt2b_hh": [f"model.restore_from_path={fake_nemo}"],
        "smollm2_hh": [f"data.path={HH_TEST}"],
    }.get(preset, [])
