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
from launcher import slurm
from launcher.plan import load_stage_config, resolve_inputs
from launcher.stages import EX_TEMPFAIL, REGISTRY
from launcher.tracking import forward_metrics

log = logging.getLogger("stage")

# PyTorch's caching allocator with expandable segments: less fragmentation when the models of a
# PPO step come and go (GPT-2B actor micro-batch 8 fits 80 GB with it, not without:
# benchmarks/ppo.md). Set before torch is imported here; a user's own setting wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


class StageTerminated(BaseException):
    """SIGTERM (or, under Slurm, SIGUSR1) with no handler of the stage's own."""

    def __init__(self, signum: int):
        super().__init__(f"received {signal.Signals(signum).name}")
        self.signum = signum


def _on_signal(signum, frame):
    raise StageTerminated(signum)


def _shutdown_distributed() -> None:
    """Tear the process group down before exit (a gloo group with async collectives left to the
    interpreter's shutdown can abort the process: "terminate called without an active exception")."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()  # no rank closes its connections while another is still using them
            dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001 - the stage's work is done; report and go on
            log.warning("destroy_process_group failed: %s", e)


def cpu_threads_per_rank() -> int | None:
    """torch's intra-op threads for one of LOCAL_WORLD_SIZE ranks on this node: its share of the cores
    (Slurm's cpus-per-task where given), so the ranks do not oversubscribe them (torch's default gives
    every process every core: 2 CPU ranks on 2 cores ran 2-3x slower). None: leave torch's default
    (one rank, or OMP_NUM_THREADS set by the user, which wins as with torchrun)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local <= 1 or os.environ.get("OMP_NUM_THREADS"):
        return None
    if slurm.cpus_per_task():
        return slurm.cpus_per_task()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local)


def _init_distributed() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch
    import torch.distributed as dist

    threads = cpu_threads_per_rank()
    if threads is not None:
        torch.set_num_threads(threads)
        log.info("%d CPU threads for this rank (%s ranks on this node; OMP_NUM_THREADS overrides)", threads,
                 os.environ.get("LOCAL_WORLD_SIZE"))

    if torch.cuda.is_available():
        # device_id binds this rank's NCCL communicator to its GPU: barriers and collectives never
        # guess the device from the global rank (NCCL warns that a guess can hang on uneven nodes)
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    log.info("torch.distributed ready: %s, rank %d of %d, rendezvous %s:%s", dist.get_backend(), dist.get_rank(),
             dist.get_world_size(), os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"))


def _debug_switches(cfg, stage: str) -> None:
    """run.detect_anomaly (debug=fdr): torch.autograd's anomaly detection for the whole stage."""
    if cfg.run.detect_anomaly and stage != "prep":
        import torch

        torch.autograd.set_detect_anomaly(True)
        log.info("stage %s: torch.autograd anomaly detection on (run.detect_anomaly=true; slower)", stage)


def _run_again(manifest: Manifest, cfg, stage: str, rank: int, why: str, requeue: bool) -> int:
    """The stage stopped early on purpose (checkpointed, or signalled): pending, and requeued under Slurm."""
    for sig in slurm.REQUEUE_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # requeueing signals this job again
    log.warning("stage %s stopped: %s", stage, why)
    if rank != 0:
        return EX_TEMPFAIL
    manifest.update_stage(stage, status="pending", requeue_note=why)
    if not (requeue and slurm.in_job()):
        manifest.update_stage(stage, requeue_note=f"{why}; run the same command again to resume")
        return EX_TEMPFAIL
    outcome = slurm.requeue_current_job(cfg.cluster.max_requeues)
    job = slurm.job_id()
    if outcome == "cancelled":
        manifest.update_stage(stage, status="cancelled", finished=now(), error=f"Slurm job {job} was cancelled")
        return 130
    if outcome == "limit":
        manifest.update_stage(stage, status="failed", finished=now(),
                              error=f"{why}; not requeued again: cluster.max_requeues={cfg.cluster.max_requeues} reached")
        return 1
    manifest.update_stage(stage, requeue_note=f"{why}; Slurm job {job} {outcome}, the stage resumes when it restarts")
    log.warning("stage %s: Slurm job %s %s", stage, job, outcome)
    return EX_TEMPFAIL


def run_stage(run_dir: Path, stage: str, requeue: bool = False) -> int:
    """Run one stage in this process. `requeue` (set under Slurm): a signal leads to a requeue, not a cancel."""
    slurm.distributed_env()
    rank = int(os.environ.get("RANK", "0"))
    log.info("stage %s: rank %s of %s (local rank %s) on %s, CUDA_VISIBLE_DEVICES=%s", stage, rank,
             os.environ.get("WORLD_SIZE", "1"), os.environ.get("LOCAL_RANK", "0"), socket.gethostname(),
             os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)"))
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
        manifest.update_stage(stage, **fields, **slurm.job_fields())
    signal.signal(signal.SIGTERM, _on_signal)
    if requeue:
        slurm.on_time_limit(_on_signal)
    try:
        _init_distributed()
        _debug_switches(cfg, stage)
        with forward_metrics(cfg, stage, run_dir / stage, rank):  # logger=wandb|mlflow: rank 0 forwards metrics
            result = REGISTRY[stage].entry()(cfg) or {}
    except SystemExit as e:
        if e.code != EX_TEMPFAIL:
            raise
        return _run_again(manifest, cfg, stage, rank, "the stage saved a checkpoint and exited 75", requeue)
    except StageTerminated as e:
        if not requeue:
            log.warning("stage %s stopped: %s", stage, e)
            if rank == 0:
                manifest.update_stage(stage, status="cancelled", finished=now(), error="stopped (StageTerminated)")
            return 130
        return _run_again(manifest, cfg, stage, rank, f"{e} (the stage has no handler of its own)", requeue)
    except KeyboardInterrupt as e:
        log.warning("stage %s stopped: %s", stage, type(e).__name__)
        if rank == 0:
            manifest.update_stage(stage, status="cancelled", finished=now(), error=f"stopped ({type(e).__name__})")
        return 130
    except Exception as e:  # noqa: BLE001 - a stage failure is reported, not re-raised
        if getattr(e, "user_facing", False):  # bad input or a full disk: the message says it all
            log.error("stage %s failed: %s", stage, e)
        else:
            traceback.print_exc()
        if rank == 0:
            manifest.update_stage(stage, status="failed", finished=now(), error=f"{type(e).__name__}: {e}")
        return 1
    _shutdown_distributed()
    if rank == 0:
        result = OmegaConf.to_container(OmegaConf.create(result)) if not isinstance(result, dict) else result
        missing = [p for p in artifact_paths(result) if not Path(p).exists() and not Path(p + ".bin").exists()]
        if missing:
            manifest.update_stage(stage, status="failed", finished=now(),
                                  error=f"stage reported artifacts that do not exist: {missing}")
            return 1
        extra = {}
        if cfg.get("export_hf") and isinstance(result.get("nemo"), str):
            try:  # export_hf=true: the stage's .nemo also as a Hugging Face folder (modeling/hf_export.py)
                from modeling.hf_export import export_hf
                result["hf"] = export_hf(result["nemo"], str(run_dir / stage / "hf"))["dir"]
                extra["hf_export_error"] = None
            except Exception as e:  # noqa: BLE001 - the .nemo is good (the next stage needs it): say why, go on
                log.error("stage %s: export_hf: no hf/ folder: %s", stage, e)
                extra["hf_export_error"] = str(e)
        manifest.update_stage(stage, status="succeeded", finished=now(), artifacts=result, **extra)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--stage", required=True, choices=sorted(REGISTRY))
    parser.add_argument("--requeue", action="store_true",
                        help="under Slurm: on SIGUSR1/SIGTERM (or the stage's exit 75) requeue the job to resume")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s", datefmt="%H:%M:%S")
    return run_stage(args.run_dir.resolve(), args.stage, requeue=args.requeue)


def _exit(code: int) -> None:
    """A rank of a distributed stage leaves without the interpreter's teardown. Its work is done and
    recorded (the manifest, closed logs and checkpoints) and the process group destroyed, but the
    destructors of torch's communication and thread-pool objects at interpreter exit can still abort
    a rank (seen in CI: one rank of a finished 2-process run died at exit, the launcher then stopped
    the other and failed the stage). A single process exits normally."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    try:
        code = main()
    except SystemExit as e:  # a stage's own sys.exit(n) or sys.exit("message")
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    _exit(code)
