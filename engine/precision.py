"""The one precision resolver: `trainer.precision` / `model.precision` values mean what PyTorch
Lightning means by them, for every stage.

| value                              | PTL                           | here (CUDA)                         |
|------------------------------------|-------------------------------|-------------------------------------|
| 32, "32", "32-true", "fp32"        | fp32                          | fp32                                |
| "bf16", "bf16-mixed"               | bf16 autocast, fp32 weights   | bf16 compute (fp32 master weights)  |
| "bf16-true"                        | bf16 weights                  | the same as bf16-mixed              |
| 16, "16", "16-mixed", "fp16"       | fp16 autocast + loss scaling  | refused: no loss scaling; use bf16  |
| "16-true", 64, "64-true"           | fp16 / fp64 weights           | refused                             |

On the CPU every stage computes in fp32 whatever the value (bf16 matmuls are slow there and the
kit's CPU runs are tests and tiny models). Torch-free: the launcher checks the value before a run.
"""
from __future__ import annotations

from typing import Any

CANONICAL = {
    "32": "32-true", "32-true": "32-true", "fp32": "32-true", "float32": "32-true",
    "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed", "bf16-true": "bf16-true", "bfloat16": "bf16-mixed",
    "16": "16-mixed", "16-mixed": "16-mixed", "fp16": "16-mixed", "16-true": "16-true",
    "64": "64-true", "64-true": "64-true",
}
SUPPORTED = ("32-true", "bf16-mixed", "bf16-true")


def normalize(value: Any, key: str = "trainer.precision") -> str:
    """PTL's canonical name for `value` (32 -> "32-true", "bf16" -> "bf16-mixed", "16" -> "16-mixed")."""
    name = CANONICAL.get(str(value).strip().lower())
    if name is None:
        raise ValueError(f"{key}={value!r}: expected one of 32 | bf16 | bf16-mixed | bf16-true "
                         "(16 / 16-mixed are PTL's fp16 with loss scaling, which the kit does not implement)")
    return name


def check(value: Any, key: str = "trainer.precision") -> str:
    """The canonical name, or a ValueError naming `key` for what the kit cannot train in."""
    name = normalize(value, key)
    if name not in SUPPORTED:
        hint = ("fp16 needs loss scaling, which the kit does not implement: use bf16 (bf16-mixed) or 32"
                if name.startswith("16") else "use bf16 (bf16-mixed) or 32")
        raise ValueError(f"{key}={value!r} ({name}): {hint}")
    return name


def compute_dtype_name(value: Any, device_type: str, key: str = "trainer.precision") -> str:
    """"bfloat16" or "float32": the dtype a stage computes in on `device_type` ("cuda", "cpu")."""
    name = check(value, key)
    if device_type == "cuda" and name.startswith("bf16"):
        return "bfloat16"
    return "float32"


def compute_dtype(value: Any, device, key: str = "trainer.precision"):
    """The torch dtype for `device` (a torch.device or its type string)."""
    import torch

    kind = device if isinstance(device, str) else device.type
    return getattr(torch, compute_dtype_name(value, kind, key))
