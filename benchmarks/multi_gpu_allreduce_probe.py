"""All-reduce bandwidth between the GPUs of this host through NCCL, fp32 and bf16, one process per
GPU (what DDP's gradient sync does). Prints algorithm bandwidth (bytes / time) per size.

    python3 benchmarks/multi_gpu_allreduce_probe.py [--gpus 2]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def work(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for mib in (64, 1024, 4096):
            n = mib * 2**20 // torch.tensor([], dtype=dtype).element_size()
            x = torch.ones(n, dtype=dtype, device="cuda")
            for _ in range(2):
                dist.all_reduce(x)
            torch.cuda.synchronize()
            t = time.perf_counter()
            reps = 5
            for _ in range(reps):
                dist.all_reduce(x)
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t) / reps
            rows.append({"dtype": str(dtype).split(".")[-1], "MiB": mib, "ms": round(dt * 1e3, 2),
                         "algbw_GBps": round(mib * 2**20 / dt / 1e9, 1)})
    if rank == 0:
        print(json.dumps({"world": world, "nccl": ".".join(map(str, torch.cuda.nccl.version())), "rows": rows}), flush=True)
        if out:
            json.dump(rows, open(out, "w"), indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    mp.spawn(work, args=(a.gpus, 29517, a.out), nprocs=a.gpus)
