"""Per-layer key/value caches and the per-sequence state the caller owns between forward passes."""

from __future__ import annotations

import mlx.core as mx
import numpy as np


class KVCache:
    """Keys and values of one decoder layer, grown in steps so a decode step rarely reallocates."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, H, L, D) keys/values; return everything cached so far."""
        length = keys.shape[2]
        end = self.offset + length
        if self.keys is None or end > self.keys.shape[2]:
            grow = ((length + self.step - 1) // self.step) * self.step
            shape = (*keys.shape[:2], grow, keys.shape[3])
            new_k, new_v = mx.zeros(shape, keys.dtype), mx.zeros(
                (*shape[:3], values.shape[3]), values.dtype
            )
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., : self.offset, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., : self.offset, :], new_v], axis=2)
        self.keys[..., self.offset : end, :] = keys
        self.values[..., self.offset : end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]


class PromptCache:
    """Everything a sequence carries between calls: one KVCache per layer and the M-RoPE deltas.

    The generation loop owns this object; modules keep no state, so two conversations never share
    rope offsets.
    """

    def __init__(self, num_layers: int) -> None:
        self.layers = [KVCache() for _ in range(num_layers)]
        self.rope_deltas: np.ndarray | None = None  # (B,) once a prompt has been processed

    @property
    def offset(self) -> int:
        return self.layers[0].offset
