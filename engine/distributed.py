"""torch.distributed helpers for data-parallel training (every training stage uses them).

The launcher's runner calls `init_process_group` (gloo on CPU, nccl on GPU) and sets the CUDA
device before a stage runs; these helpers only read that state, so a single process needs nothing.
"""
from __future__ import annotations

import os
from typing import Dict, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the only process that writes files."""
    return rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def select_device(accelerator: str = "auto") -> torch.device:
    """auto: this rank's GPU when CUDA is there, else the CPU. gpu: fail without CUDA. cpu: the CPU."""
    accelerator = (accelerator or "auto").lower()
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RuntimeError("trainer.accelerator=gpu but CUDA is not available")
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        dev = torch.device("cuda", local_rank() % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


GRAD_SYNC_DTYPES = (None, "fp32", "float32", "bf16", "bfloat16")


def bf16_grad_sync(grad_sync_dtype: Optional[str]) -> bool:
    """Whether `optim.grad_sync_dtype` asks for bf16 gradient communication (checked: fails on typos)."""
    if grad_sync_dtype not in GRAD_SYNC_DTYPES:
        raise ValueError(f"optim.grad_sync_dtype={grad_sync_dtype!r}: expected null | fp32 | bf16")
    return grad_sync_dtype in ("bf16", "bfloat16")


def wrap_ddp(model: nn.Module, device: torch.device, grad_sync_dtype: Optional[str] = None, **kwargs) -> nn.Module:
    """DistributedDataParallel when several processes run, else the model itself. Gradients live in
    the communication buckets (`gradient_as_bucket_view`: no extra copy). `grad_sync_dtype`
    (NeMo's distributed_fused_adam key): null/fp32 all-reduces fp32 gradients; bf16 halves the bytes
    (gradients are cast to bf16 for the all-reduce and back to fp32 after it, summed in bf16)."""
    bf16 = bf16_grad_sync(grad_sync_dtype)
    if world_size() <= 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    kwargs.setdefault("gradient_as_bucket_view", True)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None, **kwargs)
    if bf16:
        ddp.register_comm_hook(None, _bf16_allreduce_hook)
    return ddp


def shard_fsdp(model: nn.Module, grad_sync_dtype: Optional[str] = None) -> nn.Module:
    """FSDP2 (`fully_shard`): each transformer block is one unit (its parameters are gathered for
    its forward and backward, then freed), the root holds the rest (embeddings, final norm, heads).
    `grad_sync_dtype` as for DDP: bf16 reduce-scatters the gradients in bf16 (half the bytes).
    In place: returns the same module, now holding DTensor shards."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    bf16 = bf16_grad_sync(grad_sync_dtype)
    mp = MixedPrecisionPolicy(reduce_dtype=torch.bfloat16) if bf16 else MixedPrecisionPolicy()
    inner = unwrap(model)
    blocks = getattr(getattr(getattr(inner, "language_model", None), "encoder", None), "layers", None)
    for block in blocks or []:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def _to_wire(grad: torch.Tensor, bf16: bool) -> torch.Tensor:
    """The one gradient-averaging rule of every stage: divide by the ranks first (so a bf16 sum
    cannot overflow), then all-reduce the sum, in bf16 when `grad_sync_dtype` says so."""
    return grad.to(torch.bfloat16).div_(world_size()) if bf16 else grad.div_(world_size())


def average_gradients(grads, bf16: bool = False) -> None:
    """In place: each gradient's mean over the ranks (what DDP's hook below does per bucket), for
    trainers that hold their own fp32 master gradients (ppo's actor and critic)."""
    if world_size() <= 1:
        return
    wire = [_to_wire(g, bf16) for g in grads]
    for h in [dist.all_reduce(w, async_op=True) for w in wire]:
        h.wait()
    if bf16:
        torch._foreach_copy_(list(grads), wire)


def _bf16_allreduce_hook(state, bucket):
    """DDP communication hook: average a gradient bucket over the ranks in bf16 (NCCL and gloo)."""
    buf = bucket.buffer()
    wire = _to_wire(buf, True)
    fut = dist.all_reduce(wire, async_op=True).get_future()

    def back(f):
        buf.copy_(f.value()[0])
        return buf
    return fut.then(back)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def _backend_device(device: Optional[torch.device] = None) -> torch.device:
    if device is not None:
        return device
    if is_dist() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Mapping[str, float], device: Optional[torch.device] = None) -> Dict[str, float]:
    """Sum each value over the ranks (float64, one collective)."""
    keys = sorted(values)
    if not is_dist():
        return {k: float(values[k]) for k in keys}
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_backend_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.cpu().tolist()))


def all_reduce_mean(values: Mapping[str, float], device: Optional[torch.device] = None) -> Dict[str, float]:
    """Mean of each value over the ranks."""
    n = world_size()
    return {k: v / n for k, v in all_reduce_sum(values, device).items()}


def peak_memory_gib(device: torch.device) -> float:
    """This rank's peak memory so far on a CUDA device: what decides whether a setting fits."""
    return torch.cuda.max_memory_allocated(device) / 2**30


def all_reduce_max(value: float, device: Optional[torch.device] = None) -> float:
    if not is_dist():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_backend_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def broadcast_object(obj, src: int = 0):
    """rank `src`'s python object on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
