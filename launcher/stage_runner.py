"""What runs inside a stage's process (locally or in a Slurm task):

    python -m launcher.stage_runner --run-dir RUN --stage rm

Reads <RUN>/<stage>/config.yaml, fills inputs that earlier stages of the run produced, records
status in the manifest, sets up torch.distributed when there are several processes, and calls the
stage package's `run(cfg)`. Stage packages stay free of launcher code.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import traceback
from pathlib import Path

from omegaconf import OmegaConf

from launcher.manifest import Manifest, artifact_paths, atomic_write_text, now
from launcher.plan import load_stage_config, resolve_inputs
from launcher.stages import REGISTRY

log = logging.getLogger("stage")


class StageTerminated(BaseException):
    """SIGTERM without a stage-installed handler: stop like Ctrl-C, recorded as cancelled."""


def _on_sigterm(signum, frame):
    raise StageTerminated(f"received signal {signum}")


def _distributed_env() -> None:
    """Under Slurm, derive torch.distributed's variables from Slurm's (one task per GPU)."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    import submitit

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def _init_distributed() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def run_stage(run_dir: Path, stage: str) -> int:
    _distributed_env()
    rank = int(os.environ.get("RANK", "0"))
    manifest = Manifest(run_dir)
    cfg_path = run_dir / stage / "config.yaml"
    cfg = load_stage_config(cfg_path)
    _, _, problems = resolve_inputs(cfg, stage, manifest, this_run=[])
    if problems:
        log.error("stage %s cannot start:\n  - %s", stage, "\n  - ".join(problems))
        if rank == 0:
            manifest.update_stage(stage, status="failed", finished=now(), error="; ".join(problems))
        return 2
    if rank == 0:
        atomic_write_text(cfg_path, OmegaConf.to_yaml(cfg, resolve=True))  # the exact config it ran with
        fields = dict(status="running", started=now(), finished=None, host=socket.gethostname(), error=None)
        if os.environ.get("SLURM_JOB_ID"):
            fields["restarts"] = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        manifest.update_stage(stage, **fields)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        _init_distributed()
        result = REGISTRY[stage].entry()(cfg) or {}
    except (KeyboardInterrupt, StageTerminated) as e:
        log.warning("stage %s stopped: %s", stage, type(e).__name__)
        if rank == 0:
            manifest.update_stage(stage, status="cancelled", finished=now(), error=f"stopped ({type(e).__name__})")
        return 130
    except Exception as e:  # noqa: BLE001 - a stage failure is reported, not re-raised
        traceback.print_exc()
        if rank == 0:
            manifest.update_stage(stage, status="failed", finished=now(), error=f"{type(e).__name__}: {e}")
        return 1
    if rank == 0:
        result = OmegaConf.to_container(OmegaConf.create(result)) if not isinstance(result, dict) else result
        missing = [p for p in artifact_paths(result) if not Path(p).exists() and not Path(p + ".bin").exists()]
        if missing:
            manifest.update_stage(stage, status="failed", finished=now(),
                                  error=f"stage reported artifacts that do not exist: {missing}")
            return 1
        manifest.update_stage(stage, status="succeeded", finished=now(), artifacts=result)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--stage", required=True, choices=sorted(REGISTRY))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s", datefmt="%H:%M:%S")
    return run_stage(args.run_dir.resolve(), args.stage)


if __name__ == "__main__":
    sys.exit(main())
