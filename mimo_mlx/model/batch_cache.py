"""The cache of several sequences decoded together, one row each (continuous batching).

Each sequence is prefilled alone in its own `PromptCache`, as `generate` does (its images, video
and M-RoPE positions are its own), then joins a `BatchCache` to decode one token per step with the
others. Rows are left-padded so that every row's next token goes into the same column:

    column:   0   1   2   3   4   5
    row 0:    .   .   a0  a1  a2  a3      padding 2
    row 1:    b0  b1  b2  b3  b4  b5      padding 0

The attention mask hides the padding (its scores are -inf: exact zeros after the softmax), and
each row keeps its own rotary position, its token count plus its rope delta. A sequence leaves
with `remove`, which hands its tokens (prompt and answer so far) back to its own PromptCache, as
if it had been generated alone; columns that are padding in every remaining row are dropped.

A batch stores its rows one way: in the model's dtype, or quantized with one (bits, group size)
(`storage`). Quantized rows pad with zero words, scales and biases, which the mask hides as it
hides float padding; each token is quantized on its own, so a row's stored keys and values are
the ones it would hold alone. A sequence whose cache becomes quantized part-way
(`quantized_kv_start`) moves to a quantized batch then (`generation.batch.BatchGenerator`).
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from .cache import KVCache, LayerCache, PromptCache, QuantizedKVCache


class BatchCache:
    """Per-layer caches over (B, H, columns, D) rows, and each row's padding and rope delta.

    While a sequence is in the batch its tokens live here, and its own PromptCache holds none
    (only its rotary bookkeeping); `remove` gives them back. The model reads `layers`,
    `next_positions` and `attention_mask`, as it reads a PromptCache's.
    """

    def __init__(self, num_layers: int, storage: tuple[int, int] | None = None) -> None:
        """`storage`: None for keys and values in the model's dtype, or (bits, group size) for
        quantized ones (`storage_of` a sequence's cache says which it joins)."""
        self.storage = storage
        self.layers = [self._empty() for _ in range(num_layers)]
        self.padding = np.zeros(0, np.int64)  # (B,) padding columns before each row's tokens
        self._deltas = np.zeros(0, np.int64)  # (B,) next text position minus token count
        self._owners: list[PromptCache] = []  # each row's own cache

    def __len__(self) -> int:
        return len(self._owners)

    @property
    def offset(self) -> int:
        """Columns in use: the longest row's token count."""
        return self.layers[0].offset

    @property
    def lengths(self) -> np.ndarray:
        """(B,) tokens each row holds."""
        return self.offset - self.padding

    @property
    def nbytes(self) -> int:
        """Bytes held, padding and unused tail included."""
        return sum(layer.nbytes for layer in self.layers)

    def next_positions(self, batch: int) -> np.ndarray:
        """(B,) positions of the next text token of each row."""
        return self.lengths + self._deltas

    def attention_mask(self, length: int) -> mx.array | None:
        """(B, 1, 1, columns + 1) True where a row's next token may look: its own tokens and
        itself, never the padding before them. None when no row is padded."""
        if length != 1:
            raise ValueError(f"a batch decodes one token per row at a time, got {length}")
        if not self.padding.any():
            return None
        columns = np.arange(self.offset + 1)
        return mx.array(columns[None] >= self.padding[:, None])[:, None, None, :]

    def _empty(self) -> LayerCache:
        if self.storage is None:
            return KVCache()
        return QuantizedKVCache(*self.storage)

    def quantize_if_due(self) -> None:
        """A batch's rows keep the storage they joined with (see `add`); a row that is due to
        be quantized moves to a quantized batch before the step."""

    def record_positions(self, positions: np.ndarray) -> None:
        raise ValueError("a batch decodes text only: prefill each prompt in its own PromptCache")

    def add(self, cache: PromptCache) -> int:
        """Take `cache`'s tokens in as a new last row (it keeps none meanwhile); its index."""
        if cache.offset == 0:
            raise ValueError("an empty cache cannot join a batch: prefill its prompt first")
        if storage_of(cache) != self.storage:
            raise ValueError(
                f"a cache stored as {storage_of(cache)} cannot join a batch stored as "
                f"{self.storage}"
            )
        deltas = cache.rope_deltas
        offset, length = self.offset, cache.offset
        width = max(offset, length)
        for mine, theirs in zip(self.layers, cache.layers, strict=True):
            new = [_pad_left(part, width - length) for part in theirs.state]
            if self._owners:
                old = [_pad_left(part, width - offset) for part in mine.state]
                new = [mx.concatenate([o, n]) for o, n in zip(old, new, strict=True)]
            mine.state = tuple(new)  # every layer now holds `width` columns
        cache.layers = [layer.copy(0) for layer in cache.layers]  # empty, stored as before
        self.padding = np.append(self.padding + (width - offset), width - length)
        self._deltas = np.append(self._deltas, 0 if deltas is None else int(deltas[0]))
        self._owners.append(cache)
        return len(self._owners) - 1

    def remove(self, rows: Sequence[int]) -> list[PromptCache]:
        """Hand rows' tokens back to their own caches and drop the rows; those caches, in the
        order asked. The arrays handed back are copies: they keep nothing of the batch alive."""
        rows = list(rows)
        gone = set(rows)
        for row in rows:
            start = int(self.padding[row])
            for mine, theirs in zip(self.layers, self._owners[row].layers, strict=True):
                theirs.state = tuple(mx.contiguous(p[row : row + 1, :, start:]) for p in mine.state)
        handed = [self._owners[row] for row in rows]
        keep = [i for i in range(len(self._owners)) if i not in gone]
        self._owners = [self._owners[i] for i in keep]
        self._deltas = self._deltas[keep]
        if not keep:
            self.layers = [self._empty() for _ in self.layers]
            self.padding = np.zeros(0, np.int64)
            return handed
        drop = int(self.padding[keep].min())  # columns that are padding in every kept row
        index = mx.array(keep)
        for layer in self.layers:
            layer.state = tuple(part[index][:, :, drop:] for part in layer.state)
        self.padding = self.padding[keep] - drop
        return handed


def storage_of(cache: PromptCache) -> tuple[int, int] | None:
    """How `cache`'s layers store keys and values now: None (the model's dtype) or (bits, group
    size)."""
    layer = cache.layers[0]
    return (layer.bits, layer.group_size) if isinstance(layer, QuantizedKVCache) else None


def _pad_left(part: mx.array, count: int) -> mx.array:
    """(B, H, N, X) with `count` zero columns before the N."""
    if count == 0:
        return part
    return mx.pad(part, [(0, 0), (0, 0), (count, 0), (0, 0)])
