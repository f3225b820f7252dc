"""Reduced precision: what a device computes natively, and what training's mixed precision uses there.

Training (`train.amp`, `train.cpu_bf16`) and inference (`--precision bf16`) both ask here, so that they
agree on which processors have native bfloat16 arithmetic.
"""

from __future__ import annotations

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively (AVX512-BF16 / AMX on a CPU; Ampere or later on CUDA)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def training_autocast_dtype(device: torch.device, amp: bool = True, cpu_bf16: bool = False) -> torch.dtype | None:
    """The dtype training runs the generator's forward passes in on ``device`` (None: float32).

    CUDA: float16 with a gradient scaler where ``amp`` (``train.amp``). CPU: bfloat16 only where ``cpu_bf16``
    (``train.cpu_bf16``) and the processor has native bfloat16 arithmetic (no scaler: bfloat16 has float32's
    range); emulated bfloat16 is many times slower than float32. It is off by default because it cost real-scan
    passes in the one comparison made (runs E3p and E3pf, ``results/dixon-disc``)."""
    if device.type == "cuda":
        return torch.float16 if amp else None
    if device.type == "cpu" and cpu_bf16 and native_bf16(device):
        return torch.bfloat16
    return None


DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}  # None: no autocast


def dtype_name(dtype: torch.dtype | None) -> str:
    """``fp32`` / ``fp16`` / ``bf16``: how logs and checkpoints name a training precision."""
    return next(name for name, d in DTYPES.items() if d == dtype)
