"""Pieces both MLX runners share: the float dtype a user would pick, casting, peak memory."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from .base import MemoryReading

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def default_float() -> str:
    """float32 on the CPU (MLX's CPU half-precision math is scalar), bfloat16 on a GPU."""
    return "float32" if mx.default_device() == mx.cpu else "bfloat16"


def cast_floats(module: nn.Module, dtype: str) -> None:
    """Every floating-point parameter (quantization scales and biases included) in `dtype`; lazy."""
    target = DTYPES[dtype]
    module.update(
        tree_map(
            lambda a: a.astype(target) if mx.issubdtype(a.dtype, mx.floating) else a,
            module.parameters(),
        )
    )


def reset_peak() -> None:
    mx.clear_cache()
    mx.reset_peak_memory()


def peak() -> MemoryReading:
    return MemoryReading(
        mx.get_peak_memory(), "mx.get_peak_memory (MLX allocations, weights included)"
    )
