"""Turn one block of float32 rows into what is stored: affine-quantized triples or a float cast.

Quantization groups run along each row, so a block of whole rows quantizes exactly as the full tensor
would; that is what lets the converter stream the 1.2 GB embedding in small pieces.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mimo_mlx.errors import MimoError

from .plan import MODE, QuantSpec

MX_DTYPES = {"F16": mx.float16, "BF16": mx.bfloat16, "F32": mx.float32}


@dataclass
class ErrorStats:
    """Running |dequantized - float| over every quantized weight of one part."""

    total: float = 0.0
    count: int = 0
    max: float = 0.0

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def add(self, total: float, count: int, largest: float) -> None:
        self.total += total
        self.count += count
        self.max = max(self.max, largest)

    def as_dict(self) -> dict:
        return {"mean_abs": self.mean, "max_abs": self.max, "weights": self.count}


def quantize_weight(
    block: mx.array, spec: QuantSpec, dtype: str
) -> tuple[mx.array, mx.array, mx.array]:
    """What is stored for float32 rows `block` (rows, width): the packed weight, and the scales and
    biases in the stored float type `dtype` (lazy). Every quantized tensor of a conversion is made
    by this function, so a caller that needs the same weights in memory calls it too."""
    packed, scales, biases = mx.quantize(block, spec.group_size, spec.bits, mode=MODE)
    return packed, scales.astype(MX_DTYPES[dtype]), biases.astype(MX_DTYPES[dtype])


def quantize_block(
    name: str, block: mx.array, spec: QuantSpec, dtype: str, stats: ErrorStats
) -> list[np.ndarray]:
    """(packed weight, scales, biases) of `block` (rows, width); the error is measured against the
    scales and biases as stored in `dtype`, i.e. exactly what the loaded model will compute with."""
    packed, scales, biases = quantize_weight(block, spec, dtype)
    restored = mx.dequantize(
        packed,
        scales.astype(mx.float32),
        biases.astype(mx.float32),
        spec.group_size,
        spec.bits,
        mode=MODE,
    )
    error = mx.abs(restored - block)
    total, largest = mx.sum(error), mx.max(error)
    finite = mx.all(mx.isfinite(scales)) & mx.all(mx.isfinite(biases))
    mx.eval(packed, scales, biases, total, largest, finite)
    if not finite.item():
        raise MimoError(_not_finite(name, dtype))
    stats.add(total.item(), block.size, largest.item())
    return [to_numpy(packed), to_numpy(scales), to_numpy(biases)]


def cast_block(name: str, block: mx.array, dtype: str) -> list[np.ndarray]:
    """`block` in the float dtype it is stored in; a value that does not fit is an error."""
    stored = block.astype(MX_DTYPES[dtype])
    finite = mx.all(mx.isfinite(stored))
    mx.eval(stored, finite)
    if not finite.item():
        raise MimoError(_not_finite(name, dtype))
    return [to_numpy(stored)]


def to_numpy(array: mx.array) -> np.ndarray:
    """The raw bytes of `array` as numpy (bfloat16 travels as its uint16 bit pattern)."""
    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    return np.asarray(array)


def _not_finite(name: str, dtype: str) -> str:
    if dtype == "F16":
        return (
            f"{name} has values that are NaN or infinite once stored as float16, whose range ends "
            "at 65504: try --dtype bfloat16"
        )
    return f"{name} has values that are NaN or infinite: the checkpoint is damaged"
