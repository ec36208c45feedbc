"""Read safetensors checkpoints tensor by tensor, a block of rows at a time, without holding a file.

The header is parsed here (it is a length-prefixed JSON object) so that every tensor's place in its
file is known up front: a truncated shard is caught before any weight is converted, and each block is
read with a plain `read()` rather than a memory map, so pages already converted never count towards
the process's resident memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import mlx.core as mx
import numpy as np

from mimo_mlx.errors import MimoError

# safetensors dtype -> (bytes per element, numpy dtype the raw bytes are read as)
FLOAT_DTYPES = {"BF16": (2, np.uint16), "F16": (2, np.float16), "F32": (4, np.float32)}
_MAX_HEADER_BYTES = 100 << 20  # the format's own limit; anything larger is not a safetensors file
DOWNLOAD_AGAIN = "download it again"  # where a damaged file came from is not known


@dataclass(frozen=True)
class SourceTensor:
    """Where one checkpoint tensor lives: file, absolute byte offset, dtype and shape."""

    key: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int
    advice: str = DOWNLOAD_AGAIN  # what to do if the file turns out damaged

    @property
    def row_elements(self) -> int:
        """Elements in one slice along the first axis (the whole tensor for a 0-d or 1-d one)."""
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else math.prod(self.shape)

    @property
    def rows(self) -> int:
        return self.shape[0] if len(self.shape) > 1 else 1


def open_source(file: Path) -> BinaryIO:
    """`file` opened for reading; failing that, an error that says which file and why."""
    try:
        return open(file, "rb")
    except OSError as err:
        raise MimoError(
            f"cannot read {file} ({err.strerror or err}); every file of the checkpoint must be "
            "readable"
        ) from None


def read_header(file: Path, advice: str = DOWNLOAD_AGAIN) -> dict[str, SourceTensor]:
    """The tensors of one safetensors file, checked against the file's size (truncation).
    `advice`: what a damaged file's message tells the user to do (`checkpoint.remedy`)."""
    with open_source(file) as handle:
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise MimoError(f"{file} is truncated (it is {size} bytes long); {advice}")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER_BYTES:
            raise MimoError(f"{file} is not a safetensors file (its header length is implausible)")
        raw = handle.read(header_len)
    if len(raw) < header_len:
        raise MimoError(f"{file} is truncated inside its header; {advice}")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MimoError(f"{file} is not a safetensors file (bad header: {err})") from None
    if not isinstance(header, dict):
        raise MimoError(f"{file} is not a safetensors file (its header is not an object)")
    data_start = 8 + header_len
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        tensors[key] = _source_tensor(file, key, info, data_start, advice)
    end = max((t.start + t.nbytes for t in tensors.values()), default=data_start)
    if end > size:
        raise MimoError(
            f"{file} is truncated: its header describes {end} bytes but the file has {size}; "
            f"{advice}"
        )
    return tensors


def _source_tensor(
    file: Path, key: str, info: object, data_start: int, advice: str
) -> SourceTensor:
    try:
        dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
    except (TypeError, KeyError, ValueError) as err:
        raise MimoError(f"{file}: the header entry of {key} is malformed ({err})") from None
    if dtype not in FLOAT_DTYPES:
        raise MimoError(
            f"{file}: tensor {key} is {dtype}; only float checkpoints (BF16, F16, F32) can be "
            "converted. Is this checkpoint already quantized? Convert the original float weights."
        )
    itemsize = FLOAT_DTYPES[dtype][0]
    if end - begin != math.prod(shape) * itemsize or begin < 0:
        raise MimoError(f"{file}: tensor {key} has {end - begin} bytes for shape {list(shape)}")
    return SourceTensor(key, file, dtype, shape, data_start + begin, end - begin, advice)


def read_headers(files: list[Path], advice: str = DOWNLOAD_AGAIN) -> dict[str, SourceTensor]:
    """All tensors of a sharded checkpoint; a key found in two shards is an error."""
    tensors: dict[str, SourceTensor] = {}
    for file in files:
        shard = read_header(file, advice)
        clash = sorted(tensors.keys() & shard.keys())
        if clash:
            raise MimoError(f"{file.name} repeats tensors found in another shard: {clash[:3]}")
        tensors.update(shard)
    return tensors


def read_rows(tensor: SourceTensor, handle: BinaryIO, first: int, count: int) -> mx.array:
    """Rows [first, first + count) of `tensor` as float32, shaped (count, *shape[1:])."""
    itemsize, np_dtype = FLOAT_DTYPES[tensor.dtype]
    row_bytes = tensor.row_elements * itemsize
    try:
        handle.seek(tensor.start + first * row_bytes)
        raw = handle.read(count * row_bytes)
    except OSError as err:  # e.g. a disk or network share gone away mid-read
        raise MimoError(f"reading {tensor.file} failed: {err.strerror or err}") from None
    if len(raw) != count * row_bytes:
        raise MimoError(f"{tensor.file} ended early while reading {tensor.key}; {tensor.advice}")
    shape = (count, *tensor.shape[1:]) if len(tensor.shape) > 1 else tensor.shape
    block = mx.array(np.frombuffer(raw, dtype=np_dtype)).reshape(shape)
    if tensor.dtype == "BF16":
        block = block.view(mx.bfloat16)  # numpy has no bfloat16: the raw bits travel as uint16
    return block.astype(mx.float32)
