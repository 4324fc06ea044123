"""Which torch device and dtype a model runs on: one reading of ``--device``/``--dtype`` for the
teacher (stage 1) and for evaluation (stage 2)."""

from __future__ import annotations

import torch

from logitcache.errors import LogitCacheError

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; one line if unusable."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise LogitCacheError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LogitCacheError(f"--device {device}: CUDA is not available here; use --device cpu.")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 (float16 without bf16 support) on CUDA, float32 on CPU; or a named dtype."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise LogitCacheError(f"--dtype {dtype!r} is not one of auto, float32, bfloat16, float16.")
    return _DTYPES[dtype]
