"""The one module that knows Slurm. (Submission through submitit lands with issue 3.)"""
from __future__ import annotations

import shlex
from typing import List

from launcher.errors import ConfigError
from launcher.executors import processes_per_node, runner_argv
from launcher.plan import StageJob


class SlurmExecutor:
    name = "slurm"

    def __init__(self, cluster):
        self.cluster = cluster

    def sbatch_options(self, job: StageJob) -> List[str]:
        c = self.cluster
        opts = [f"--job-name=rlhf-{job.cfg.run.name}-{job.stage}", f"--nodes={c.nodes}",
                f"--ntasks-per-node={processes_per_node(c)}", f"--time={c.time}",
                f"--output={job.stage_dir}/slurm-%j.out"]
        if c.gpus_per_node:
            opts.append(f"--gpus-per-node={c.gpus_per_node}" if c.gpu_option == "gpus_per_node"
                        else f"--gres=gpu:{c.gpus_per_node}")
        for key in ("partition", "account", "qos", "cpus_per_task", "mem", "constraint"):
            value = c[key]
            if value is not None:
                opts.append(f"--{key.replace('_', '-')}={value}")
        return opts

    def render(self, job: StageJob) -> str:
        lines = ["#!/bin/bash"] + [f"#SBATCH {o}" for o in self.sbatch_options(job)]
        lines += list(self.cluster.setup)
        lines.append("srun " + shlex.join(runner_argv(job)))
        return "\n".join(lines) + "\n"

    def run(self, jobs, manifest) -> int:
        raise ConfigError("cluster=slurm: submission is not implemented yet (issue 3); dry_run=true renders the script")
