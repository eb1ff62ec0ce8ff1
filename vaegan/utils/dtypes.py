"""Precision names a user may give, on the command line or in Python."""

from __future__ import annotations

import torch

DTYPE_NAMES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from itself or from a name in `DTYPE_NAMES` ("bf16", "float16", ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[dtype]


def cast_floating(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Floating-point tensors to `dtype`; integers (BatchNorm's batch count) stay what they are."""
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
