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
            new_k, new_v = (
                mx.zeros(shape, keys.dtype),
                mx.zeros((*shape[:3], values.shape[3]), values.dtype),
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

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        """The cached keys and values (B, H, offset, D), without the unused tail."""
        if self.keys is None:
            return ()
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @state.setter
    def state(self, value: tuple[mx.array, mx.array]) -> None:
        self.keys, self.values = value
        self.offset = self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held, unused tail included."""
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def trim(self, count: int) -> int:
        """Forget the last `count` tokens (the buffer is kept and overwritten); returns how many."""
        count = min(self.offset, max(0, count))
        self.offset -= count
        return count


class PromptCache:
    """Everything a sequence carries between calls: a KVCache per layer and its rotary positions.

    Text continues at `offset + rope_deltas` (the same on all three M-RoPE axes). Images and video
    move that point: after a vision segment, text continues at the largest position so far + 1, not
    at the token count. The cache records, for every chunk that came with explicit positions, the
    next text position after each of its tokens, so `trim` can return to any earlier point with the
    right deltas. The generation loop owns this object; modules keep no state.
    """

    def __init__(self, num_layers: int) -> None:
        self.layers = [KVCache() for _ in range(num_layers)]
        # (start offset, next text position after each token: (B, L)) per positioned chunk.
        self._marks: list[tuple[int, np.ndarray]] = []

    @property
    def offset(self) -> int:
        return self.layers[0].offset

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
    def state(self) -> list[tuple[mx.array, mx.array] | tuple[()]]:
        return [layer.state for layer in self.layers]

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def copy(self, length: int) -> PromptCache:
        """A separate cache holding this one's first `length` tokens (the arrays are shared until
        either cache writes, which gives the writer new ones)."""
        other = PromptCache(len(self.layers))
        length = min(length, self.offset)
        for mine, theirs in zip(self.layers, other.layers, strict=True):
            if length:
                theirs.state = (mine.keys[..., :length, :], mine.values[..., :length, :])
        other._marks = [(s, p[:, : length - s]) for s, p in self._marks if s < length]
        return other

    @property
    def marks(self) -> list[tuple[int, np.ndarray]]:
        """The rotary bookkeeping, for saving a cache (see `restore_marks`)."""
        return list(self._marks)

    def restore_marks(self, marks: list[tuple[int, np.ndarray]]) -> None:
        self._marks = [(int(start), np.asarray(pos, np.int64)) for start, pos in marks]
