"""Reduced precision: what a device computes natively, and what training's mixed precision uses there.

Training (`train.amp`) and inference (`--precision bf16`) both ask here, so that they agree on which
processors have native bfloat16 arithmetic.
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


def training_autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype `train.amp` runs the generator's forward passes in on ``device``: float16 on CUDA (with a
    gradient scaler), bfloat16 on a CPU with native bfloat16 arithmetic (no scaler: bfloat16 has float32's
    range), None (float32) on any other CPU, where emulated bfloat16 is many times slower than float32."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and native_bf16(device):
        return torch.bfloat16
    return None


DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}  # None: no autocast


def dtype_name(dtype: torch.dtype | None) -> str:
    """``fp32`` / ``fp16`` / ``bf16``: how logs and checkpoints name a training precision."""
    return next(name for name, d in DTYPES.items() if d == dtype)


def can_autocast(dtype: torch.dtype | None, device: torch.device) -> bool:
    """Whether training on ``device`` can run in ``dtype`` (None: float32, always) at a useful speed."""
    if dtype is None:
        return True
    if dtype == torch.float16:
        return device.type == "cuda"
    return native_bf16(device)
