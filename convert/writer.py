"""Write sharded safetensors whose headers are known before any data exists, then stream the data.

All output shapes are planned up front, so each shard's header (names, dtypes, shapes, offsets) is
written first and every tensor's bytes go straight to their place, block by block: the writer never
holds more than the block it is given.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .plan import OutputTensor

INDEX_FILE = "model.safetensors.index.json"
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
DEFAULT_SHARD_BYTES = 5 << 30  # as mlx-lm: few files, each well under any filesystem limit


def assign_shards(
    groups: Sequence[Sequence[OutputTensor]], max_bytes: int
) -> list[list[OutputTensor]]:
    """Consecutive groups packed into shards of at most `max_bytes` (a larger group gets its own).

    A group (a weight with its scales and biases) never straddles two shards, because its parts are
    written side by side from the same block of rows.
    """
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for group in groups:
        group_bytes = sum(t.nbytes for t in group)
        if shards[-1] and size + group_bytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(group)
        size += group_bytes
    return shards


def _header(tensors: list[OutputTensor]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    entries: dict = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for tensor in tensors:
        entries[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    start = 8 + len(raw)
    spans = {
        name: (start + e["data_offsets"][0], start + e["data_offsets"][1])
        for name, e in entries.items()
        if name != "__metadata__"
    }
    return struct.pack("<Q", len(raw)) + raw, spans


class ShardedWriter:
    """Streams planned tensors into `folder`; `write` appends the next block of one tensor.

    Shards are filled in order and closed as soon as the next one is needed, each checked to be
    complete, so at most one file is open.
    """

    def __init__(self, folder: Path, groups: Sequence[Sequence[OutputTensor]], max_bytes: int):
        self.folder = folder
        self.shards = assign_shards(groups, max_bytes)
        count = len(self.shards)
        self.names = [SHARD_NAME.format(i + 1, count) for i in range(count)]
        self.shard_of = {t.name: i for i, shard in enumerate(self.shards) for t in shard}
        self._current = -1
        self._file = None
        self._cursor: dict[str, int] = {}
        self._end: dict[str, int] = {}

    def write(self, name: str, data: np.ndarray) -> None:
        shard = self.shard_of[name]
        if shard != self._current:
            if shard < self._current:
                raise RuntimeError(f"{name} arrived after its shard was closed")
            self._open(shard)
        cursor = self._cursor[name]
        data = np.ascontiguousarray(data)
        if cursor + data.nbytes > self._end[name]:
            raise RuntimeError(f"{name}: more data than its planned shape")
        self._file.seek(cursor)
        self._file.write(data.data)
        self._cursor[name] = cursor + data.nbytes

    def _open(self, shard: int) -> None:
        self._close_current()
        header, spans = _header(self.shards[shard])
        self._file = open(self.folder / self.names[shard], "wb")
        self._file.write(header)
        self._cursor = {name: begin for name, (begin, _) in spans.items()}
        self._end = {name: end for name, (_, end) in spans.items()}
        self._current = shard

    def _close_current(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        short = [name for name, end in self._end.items() if self._cursor[name] != end]
        if short:
            raise RuntimeError(f"{self.names[self._current]}: incomplete tensors {short[:3]}")

    def close(self) -> dict:
        """Finish the last shard, write the index, and return it."""
        self._close_current()
        if self._current != len(self.shards) - 1:
            raise RuntimeError("not every shard was written")
        index = {
            "metadata": {"total_size": sum(t.nbytes for s in self.shards for t in s)},
            "weight_map": {t.name: self.names[i] for i, s in enumerate(self.shards) for t in s},
        }
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
        return index

    def abort(self) -> None:
        """Close the open file without checks (the caller removes the folder)."""
        if self._file is not None:
            self._file.close()
            self._file = None
