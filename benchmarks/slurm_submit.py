"""Wall time from the command to all jobs queued, on the real Slurm of tests/slurm/start_slurm.sh:

  chain   python launcher/main.py stage=all cluster=slurm            (3 jobs, afterok; returns once queued)
  sweep   python launcher/main.py -m stage=rm rm.model.optim.lr=<16 values> hydra/launcher=submitit_slurm
  bare    benchmarks/slurm_bare_app.py -m +lr=<16 values> hydra/launcher=submitit_slurm   (the reference)

"Queued" is when squeue lists every job (every array task for a sweep); the clock starts just before
the command is started. Sweeps are submitted held (`hydra.launcher.additional_parameters={hold:true}`,
the same for both) so nothing runs while measuring; Hydra's launcher then waits for results, so it is
stopped and its array cancelled once measured. Runs alternate kit/bare so drift hits both alike.

    python benchmarks/slurm_submit.py [--repeats 5] [--out benchmarks/slurm_submit/results.json] [--before OLD.json]

`--before`: a result of this script from an earlier version of the kit (run from a checkout of that
version, same machine, same session), kept in the new result under "before" for the ratio it had.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LRS = ",".join(f"{1e-6 * (i + 1):.1e}" for i in range(16))


def queued(name: str) -> int:
    r = subprocess.run(["squeue", "-h", "-r", "-n", name, "-o", "%i"], capture_output=True, text=True)
    return len(r.stdout.split())


def timed(argv, name: str, expect: int, returns: bool) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while queued(name) < expect:
            if proc.poll() is not None and (proc.returncode or not returns):
                raise RuntimeError(f"{argv[:3]} exited {proc.returncode} before queuing: {proc.stderr.read()[-2000:]}")
            time.sleep(0.02)
        elapsed = time.perf_counter() - t0
        if returns:
            proc.wait(timeout=60)
            assert proc.returncode == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.terminate()  # hydra-submitit-launcher waits for the (held) results
            proc.wait(timeout=30)
        for one in name.split(","):  # scancel -n takes one name (squeue -n takes a list)
            subprocess.run(["scancel", "-n", one], check=False)
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "slurm_submit/results.json")
    ap.add_argument("--before", type=Path, help="an earlier result of this script, to keep alongside")
    args = ap.parse_args()
    py, tmp = sys.executable, Path(tempfile.mkdtemp(prefix="slurm_bench_"))
    hold = ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug", "hydra.launcher.timeout_min=5",
            "+hydra.launcher.additional_parameters={hold:true}"]
    times = {"chain_3_stages": [], "kit_sweep_16": [], "bare_hydra_sweep_16": []}
    for i in range(args.repeats):
        name = f"rlhf-bench{i}"
        times["chain_3_stages"].append(timed(
            [py, "launcher/main.py", "stage=all", "cluster=slurm", f"run.name=bench{i}", f"run.dir={tmp}/chain{i}"],
            f"{name}-prep,{name}-rm,{name}-ppo", 3, returns=True))
        times["kit_sweep_16"].append(timed(
            [py, "launcher/main.py", "-m", "stage=rm", f"rm.model.optim.lr={LRS}", *hold,
             f"hydra.launcher.name=kit{i}", f"hydra.sweep.dir={tmp}/kit{i}"], f"kit{i}", 16, returns=False))
        times["bare_hydra_sweep_16"].append(timed(
            [py, "benchmarks/slurm_bare_app.py", "-m", f"+lr={LRS}", *hold, f"hydra.launcher.name=bare{i}",
             f"hydra.sweep.dir={tmp}/bare{i}"], f"bare{i}", 16, returns=False))
        print({k: round(v[-1], 3) for k, v in times.items()}, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.node()}: {platform.processor() or platform.machine()}, "
                   f"{subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores",
        "slurm": subprocess.run(["sinfo", "--version"], capture_output=True, text=True).stdout.strip(),
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "ratio_kit_sweep_vs_bare": round(med["kit_sweep_16"] / med["bare_hydra_sweep_16"], 3),
        "ratio_chain_vs_bare_sweep": round(med["chain_3_stages"] / med["bare_hydra_sweep_16"], 3),
        "goal": "kit within 1.2x of hydra-submitit-launcher submitting the same sweep of a bare Hydra app",
    }
    if args.before:
        old = json.loads(args.before.read_text())
        result["before"] = {k: old[k] for k in ("command", "seconds", "median_s", "ratio_kit_sweep_vs_bare")}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
