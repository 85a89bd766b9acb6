"""Wall time of `python launcher/main.py ... dry_run=true` for every preset x cluster.

    python benchmarks/launcher_dry_run.py [--repeat 5] [--out benchmarks/launcher_dry_run.md]

Times the real command line (interpreter start, imports, Hydra composition, validation, planning,
rendering and writing the dry-run files), and, for scale, a bare `python -c "import hydra"`.
Goal (issue 2): well under 2 s.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXTRA = {"gpt2b_hh": ["model.restore_from_path=/data/GPT-2B-001_bf16_tp1.nemo"],
         "smollm2_hh": ["data.path=/data/hh-rlhf"]}


def timed(cmd) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "launcher_dry_run.md"))
    args = ap.parse_args()
    presets = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
    clusters = sorted(p.stem for p in (ROOT / "conf" / "cluster").glob("*.yaml"))
    rows = []
    base = [statistics.median(timed([sys.executable, "-c", "import hydra, omegaconf"]) for _ in range(args.repeat))]
    with tempfile.TemporaryDirectory() as tmp:
        for preset in presets:
            for cluster in clusters:
                cmd = [sys.executable, "launcher/main.py", f"experiment={preset}", f"cluster={cluster}",
                       "dry_run=true", f"run.dir={tmp}/{preset}-{cluster}", *EXTRA.get(preset, [])]
                times = [timed(cmd) for _ in range(args.repeat)]
                rows.append((preset, cluster, statistics.median(times), min(times), max(times)))
    lines = [
        "# Launcher: dry-run wall time (goal well under 2 s)", "",
        f"Command: `python benchmarks/launcher_dry_run.py --repeat {args.repeat}`  ",
        f"Machine: {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}. Each row runs `python launcher/main.py experiment=P cluster=C dry_run=true` "
        f"(all three stages rendered and written) {args.repeat} times.", "",
        f"Baseline, `python -c 'import hydra, omegaconf'`: {base[0]:.2f} s", "",
        "| preset | cluster | median s | min s | max s |", "|---|---|---|---|---|",
    ] + [f"| {p} | {c} | {med:.2f} | {lo:.2f} | {hi:.2f} |" for p, c, med, lo, hi in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
