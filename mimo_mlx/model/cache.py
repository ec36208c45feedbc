"""Per-layer key/value caches, in full precision or quantized, and the per-sequence state the
caller owns between forward passes.

A quantized layer stores keys and values as MLX's affine quantization along the head dimension
(mlx-lm's `QuantizedKVCache`): `bits`-bit integers packed into uint32 words, and a scale and a
bias for every `group_size` values. Each token's vector is quantized on its own, so the stored
cache does not depend on how the tokens arrived (in one pass, in chunks, or reused from an
earlier turn), and trimming, copying and saving work on it as on a float one.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..errors import MimoError
from ..options import KV_GROUP_SIZES, CacheOptions


@dataclass(frozen=True)
class QuantizedArray:
    """(..., D) values in MLX's affine quantization along the last axis: `packed` (..., D *
    bits / 32) uint32, `scales` and `biases` (..., D / group_size); value = scale * q + bias."""

    packed: mx.array
    scales: mx.array
    biases: mx.array
    group_size: int
    bits: int

    @classmethod
    def quantize(cls, x: mx.array, group_size: int, bits: int) -> QuantizedArray:
        return cls(*mx.quantize(x, group_size=group_size, bits=bits), group_size, bits)

    @property
    def parts(self) -> tuple[mx.array, mx.array, mx.array]:
        """(packed, scales, biases): the arguments MLX's quantized ops take after the input."""
        return self.packed, self.scales, self.biases

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the values it stands for."""
        return (*self.packed.shape[:-1], self.packed.shape[-1] * 32 // self.bits)

    def dequantize(self) -> mx.array:
        return mx.dequantize(*self.parts, group_size=self.group_size, bits=self.bits)


class _TokenBuffers:
    """Arrays (B, H, capacity, X) written token by token along axis 2, grown in steps of 256
    so a decode step rarely reallocates; `offset` tokens are in use."""

    step = 256

    def __init__(self) -> None:
        self._buffers: tuple[mx.array, ...] | None = None
        self.offset = 0

    def _append(self, rows: tuple[mx.array, ...]) -> tuple[mx.array, ...]:
        """Write (B, H, L, X) rows after the tokens in use; return every buffer's tokens so far."""
        length = rows[0].shape[2]
        end = self.offset + length
        if self._buffers is None or end > self._buffers[0].shape[2]:
            grow = ((length + self.step - 1) // self.step) * self.step
            new = [mx.zeros((*r.shape[:2], grow, r.shape[3]), r.dtype) for r in rows]
            if self._buffers is not None:
                kept = self._tokens(self.offset)
                new = [mx.concatenate([old, n], axis=2) for old, n in zip(kept, new, strict=True)]
            self._buffers = tuple(new)
        for buffer, r in zip(self._buffers, rows, strict=True):
            buffer[..., self.offset : end, :] = r
        self.offset = end
        return self._tokens(end)

    def _tokens(self, length: int) -> tuple[mx.array, ...]:
        return tuple(buffer[..., :length, :] for buffer in self._buffers)

    @property
    def state(self) -> tuple[mx.array, ...]:
        """The arrays in use (B, H, offset, X), without the unused tail; named by `state_names`."""
        return () if self._buffers is None else self._tokens(self.offset)

    @state.setter
    def state(self, value: tuple[mx.array, ...]) -> None:
        self._buffers = tuple(value)
        self.offset = self._buffers[0].shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held, unused tail included."""
        return 0 if self._buffers is None else sum(b.nbytes for b in self._buffers)

    def trim(self, count: int) -> int:
        """Forget the last `count` tokens (the buffers are kept and overwritten); returns how
        many."""
        count = min(self.offset, max(0, count))
        self.offset -= count
        return count


class KVCache(_TokenBuffers):
    """Keys and values of one decoder layer, in the model's dtype."""

    state_names = ("keys", "values")

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, H, L, D) keys/values; return everything cached so far."""
        return self._append((keys, values))

    def copy(self, length: int) -> KVCache:
        """A cache holding this one's first `length` tokens (arrays shared until either writes)."""
        other = KVCache()
        if length:
            other.state = self._tokens(length)
        return other


class QuantizedKVCache(_TokenBuffers):
    """Keys and values of one decoder layer, quantized to `bits` with `group_size` values per
    scale and bias. `update_and_fetch` returns `QuantizedArray`s, which `language.attention`
    reads with quantized matmuls."""

    state_names = ("keys", "key_scales", "key_biases", "values", "value_scales", "value_biases")

    def __init__(self, bits: int, group_size: int) -> None:
        super().__init__()
        self.bits, self.group_size = bits, group_size

    @classmethod
    def from_float(cls, cache: KVCache, bits: int, group_size: int) -> QuantizedKVCache:
        """`cache`'s tokens, quantized (mlx-lm's `to_quantized`)."""
        quantized = cls(bits, group_size)
        if cache.offset:
            keys, values = cache.state
            quantized.state = (
                *mx.quantize(keys, group_size=group_size, bits=bits),
                *mx.quantize(values, group_size=group_size, bits=bits),
            )
        return quantized

    def update_and_fetch(
        self, keys: mx.array, values: mx.array
    ) -> tuple[QuantizedArray, QuantizedArray]:
        """Quantize and append (B, H, L, D) keys/values; return everything cached so far."""
        rows = (
            *mx.quantize(keys, group_size=self.group_size, bits=self.bits),
            *mx.quantize(values, group_size=self.group_size, bits=self.bits),
        )
        return self._pair(self._append(rows))

    def _pair(self, parts: tuple[mx.array, ...]) -> tuple[QuantizedArray, QuantizedArray]:
        return (
            QuantizedArray(*parts[:3], self.group_size, self.bits),
            QuantizedArray(*parts[3:], self.group_size, self.bits),
        )

    def copy(self, length: int) -> QuantizedKVCache:
        other = QuantizedKVCache(self.bits, self.group_size)
        if length:
            other.state = self._tokens(length)
        return other


LayerCache = KVCache | QuantizedKVCache


def check_cache_options(options: CacheOptions, head_dim: int) -> None:
    """A group size must divide the head dimension the cache quantizes along; the error names
    the sizes that do (a tiny model's head may take only 32)."""
    if options.kv_bits is not None and head_dim % options.kv_group_size:
        fitting = [str(size) for size in KV_GROUP_SIZES if head_dim % size == 0]
        advice = (
            f"use a group size that divides it: {' or '.join(fitting)}"
            if fitting
            else "no group size MLX quantizes with divides it: its cache cannot be quantized"
        )
        raise MimoError(
            f"kv_group_size {options.kv_group_size} does not divide this model's head dimension "
            f"({head_dim}): the cache is quantized along it; {advice}"
        )


class PromptCache:
    """Everything a sequence carries between calls: a cache per layer and its rotary positions.

    Text continues at `offset + rope_deltas` (the same on all three M-RoPE axes). Images and video
    move that point: after a vision segment, text continues at the largest position so far + 1, not
    at the token count. The cache records, for every chunk that came with explicit positions, the
    next text position after each of its tokens, so `trim` can return to any earlier point with the
    right deltas. The generation loop owns this object; modules keep no state.

    `options` say how the layers store keys and values: in the model's dtype, or (with kv_bits)
    quantized once the cache holds `quantized_kv_start` tokens (`quantize_if_due`, which the
    model calls before each forward pass). A quantized cache stays quantized, trims included.
    """

    def __init__(self, num_layers: int, options: CacheOptions | None = None) -> None:
        self.options = options if options is not None else CacheOptions()
        self.layers: list[LayerCache] = [KVCache() for _ in range(num_layers)]
        # (start offset, next text position after each token: (B, L)) per positioned chunk.
        self._marks: list[tuple[int, np.ndarray]] = []

    @property
    def offset(self) -> int:
        return self.layers[0].offset

    @property
    def quantized(self) -> bool:
        """Whether the layers hold their keys and values quantized (from now on)."""
        return isinstance(self.layers[0], QuantizedKVCache)

    def quantize_if_due(self) -> None:
        """With kv_bits, once the cache holds `quantized_kv_start` tokens: quantize what it
        holds and store every later token quantized (mlx-lm's `maybe_quantize_kv_cache`)."""
        if self.offset >= self.options.quantized_kv_start:
            self.quantize()

    def quantize(self) -> None:
        """With kv_bits: quantize what the layers hold and store every later token quantized."""
        bits, group = self.options.kv_bits, self.options.kv_group_size
        if bits is None or self.quantized:
            return
        self.layers = [QuantizedKVCache.from_float(layer, bits, group) for layer in self.layers]

    @property
    def rope_deltas(self) -> np.ndarray | None:
        """(B,) next text position minus offset; None while no positioned chunk was seen."""
        if not self._marks:
            return None
        start, next_positions = self._marks[-1]
        return next_positions[:, -1] - (start + next_positions.shape[1])

    def next_positions(self, batch: int) -> np.ndarray:
        """(B,) positions of the next text token of each row."""
        deltas = self.rope_deltas
        return self.offset + (np.zeros(batch, np.int64) if deltas is None else deltas)

    def attention_mask(self, length: int) -> None:
        """No mask beyond the causal rule: every row attends to every cached token (compare
        `BatchCache.attention_mask`)."""
        return None

    def record_positions(self, positions: np.ndarray) -> None:
        """Note explicit (3, B, L) positions of tokens about to be appended at `offset`."""
        positions = np.asarray(positions)
        previous = self.next_positions(positions.shape[1])
        running = np.maximum.accumulate(positions.max(axis=0) + 1, axis=-1)  # (B, L)
        self._marks.append((self.offset, np.maximum(running, previous[:, None])))

    def trim(self, count: int) -> int:
        """Forget the last `count` tokens, rotary bookkeeping included; returns how many."""
        count = min(self.offset, max(0, count))
        self.truncate(self.offset - count)
        return count

    def truncate(self, length: int) -> int:
        """Keep at most the first `length` tokens in every layer, rotary bookkeeping included, and
        no more than the shortest layer holds: a forward pass stopped midway (Ctrl-C) leaves the
        later layers one chunk behind. Returns the tokens kept."""
        end = max(0, min(length, *(layer.offset for layer in self.layers)))
        for layer in self.layers:
            layer.trim(layer.offset - end)
        self._marks = [(start, p[:, : end - start]) for start, p in self._marks if start < end]
        return end

    @property
    def state(self) -> list[tuple[mx.array, ...]]:
        return [layer.state for layer in self.layers]

    @property
    def nbytes(self) -> int:
        """Bytes the layers hold (quantized: packed values, scales and biases)."""
        return sum(layer.nbytes for layer in self.layers)

    def copy(self, length: int) -> PromptCache:
        """A separate cache holding this one's first `length` tokens, stored as this one is (the
        arrays are shared until either cache writes, which gives the writer new ones)."""
        other = PromptCache(len(self.layers), self.options)
        length = min(length, self.offset)
        other.layers = [layer.copy(length) for layer in self.layers]
        other._marks = [(s, p[:, : length - s]) for s, p in self._marks if s < length]
        return other

    @property
    def marks(self) -> list[tuple[int, np.ndarray]]:
        """The rotary bookkeeping, for saving a cache (see `restore_marks`)."""
        return list(self._marks)

    def restore_marks(self, marks: list[tuple[int, np.ndarray]]) -> None:
        self._marks = [(int(start), np.asarray(pos, np.int64)) for start, pos in marks]
