"""Load one rank's part of a model folder, reading only the bytes of that rank's slices.

A safetensors file is a length-prefixed JSON header and then each tensor's bytes, row-major. The
header says where every tensor lies, so a slice along the first axis is one contiguous read, and a
slice along the last axis is one read per row. No rank ever reads or holds a whole split tensor:
for a sharded-to-all layer it reads the columns it multiplies, for an all-to-sharded one its rows.
Float, bfloat16 and quantized (uint32 weights, float scales and biases) tensors are read the same
way. Tensors every rank holds whole (embedding, lm_head, norms, patch embedding) are read whole.

    group = start_group()
    model, processor = load_sharded("./mimo-vl-7b-rl-4bit", group)
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..errors import MimoError
from ..inputs.processor import Processor
from ..loading import DTYPES, default_dtype, resolve_model
from ..model.checkpoint import (
    check_weights,
    quantize_like,
    read_config,
    remedy,
    safetensors_files,
)
from ..model.config import ModelConfig
from ..model.weights import canonical_key, detect_layout, is_ignored, to_mlx_layout
from .group import Group
from .sharding import ShardedModel, check_heads, param_axis, part_ranges, shard_model

# safetensors dtype -> numpy dtype its bytes are read as (bfloat16 travels as uint16 bits).
STORED_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "U64": np.uint64,
    "I64": np.int64,
    "U32": np.uint32,
    "I32": np.int32,
    "U16": np.uint16,
    "I16": np.int16,
    "U8": np.uint8,
    "I8": np.int8,
    "BOOL": np.bool_,
}
_MAX_HEADER_BYTES = 100 << 20  # the format's own limit


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie: file, absolute offset, dtype and shape (row-major)."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int

    @property
    def itemsize(self) -> int:
        return np.dtype(STORED_DTYPES[self.dtype]).itemsize


class _Shaped:
    """Stands in for an array in `check_weights`, which only looks at shapes."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape


def load_sharded(
    path_or_hf_repo: str | Path,
    group: Group,
    revision: str | None = None,
    dtype: str | mx.Dtype | None = None,
) -> tuple[ShardedModel, Processor]:
    """(model, processor) of this rank: the model's split layers hold only this rank's slices.

    Every rank calls it with the same arguments (the folder must be on every host, at the same
    path); it returns once every rank has loaded. A hub id must have been converted on each host
    already. dtype as for `loading.load` (float32 on the CPU unless given).
    """
    folder = resolve_model(path_or_hf_repo, revision, on_convert=_refuse_conversion)
    dtype = dtype if dtype is not None else default_dtype()
    return load_sharded_model(folder, group, dtype), Processor.from_folder(folder)


def load_sharded_model(
    path: str | Path, group: Group, dtype: str | mx.Dtype | None = None
) -> ShardedModel:
    """This rank's `ShardedModel` from a model folder (any layout `load_model` reads).

    Head counts are checked against the group size before anything else is read, the layer
    widths (and quantization groups) once the headers are, before any tensor data.
    """
    folder = Path(path)
    raw = read_config(folder)
    config = ModelConfig.from_hf(raw)
    check_heads(config, group.size)
    stored, layout = stored_tensors(folder, raw, config)
    model = ShardedModel(config, group)
    quantize_like(model, stored, raw.get("quantization"))
    check_weights(model, {k: _Shaped(_mlx_shape(k, t, layout)) for k, t in stored.items()}, folder)
    plan = shard_model(model, group.mx_group)
    target = DTYPES[dtype] if isinstance(dtype, str) else dtype
    weights = []
    for key, _ in tree_flatten(model.parameters()):
        module, name = key.rsplit(".", 1)
        split = plan.get(module)
        axis = None if split is None else param_axis(split, name)
        if axis is None:
            value = to_mlx_layout(key, read_tensor(stored[key]), layout)
        else:
            ranges = part_ranges(stored[key].shape[axis], group.rank, group.size, split.segments)
            value = read_slices(stored[key], axis, ranges)
        if target is not None and mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(target)
        mx.eval(value)  # one tensor at a time: the stored copy is freed before the next is read
        weights.append((key, value))
    model.load_weights(weights, strict=True)
    group.barrier("for the other ranks to finish loading")
    return model


def stored_tensors(
    folder: Path, raw: dict, config: ModelConfig
) -> tuple[dict[str, StoredTensor], str]:
    """Every tensor the model uses, under this package's names, and the folder's layout
    (`weights.detect_layout`, from the names as stored), from the files' headers only."""
    files = safetensors_files(folder)
    headers = [read_header(file, remedy(folder, raw)) for file in files]
    layout = detect_layout([key for header in headers for key in header], raw)
    tensors: dict[str, StoredTensor] = {}
    for header, file in zip(headers, files, strict=True):
        for key, tensor in header.items():
            name = canonical_key(key)
            if is_ignored(key) or (config.text.tie_word_embeddings and name.startswith("lm_head.")):
                continue
            if name in tensors:
                raise MimoError(f"{file.name} repeats {name}, found in another shard")
            tensors[name] = tensor
    return tensors, layout


def read_header(file: Path, advice: str = "download it again") -> dict[str, StoredTensor]:
    """The tensors of one safetensors file, checked against the file's size; `advice` says what
    to do about a damaged one."""
    try:
        with open(file, "rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(0)
            prefix = handle.read(8)
            (length,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (None,)
            if length is None or length > _MAX_HEADER_BYTES:
                raise MimoError(f"{file} is not a safetensors file; {advice}")
            header = json.loads(handle.read(length))
    except OSError as err:
        raise MimoError(f"cannot read {file} ({err.strerror or err})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MimoError(f"{file} is not a safetensors file (bad header: {err})") from None
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        tensor = _stored(file, key, info, 8 + length)
        if tensor.start + math.prod(tensor.shape) * tensor.itemsize > size:
            raise MimoError(f"{file} is truncated (it ends inside {key}); {advice}")
        tensors[key] = tensor
    return tensors


def read_tensor(tensor: StoredTensor) -> mx.array:
    """A whole tensor, in its stored dtype."""
    return read_slices(tensor, 0, [(0, tensor.shape[0])]) if tensor.shape else _scalar(tensor)


def read_slices(tensor: StoredTensor, axis: int, ranges: list[tuple[int, int]]) -> mx.array:
    """The parts [start, end) of `tensor` along `axis`, concatenated along it: only their bytes
    are read (one read per range along axis 0, one per row and range along a later axis)."""
    shape = tensor.shape
    axis = axis % len(shape)
    outer = math.prod(shape[:axis])
    inner = math.prod(shape[axis + 1 :]) * tensor.itemsize  # bytes of one index along `axis`
    stride = shape[axis] * inner
    width = sum(end - start for start, end in ranges)
    out = np.empty(outer * width * inner, dtype=np.uint8)
    view, filled = memoryview(out), 0
    with _open(tensor.file) as handle:
        for row in range(outer):
            for start, end in ranges:
                count = (end - start) * inner
                handle.seek(tensor.start + row * stride + start * inner)
                if handle.readinto(view[filled : filled + count]) != count:
                    raise MimoError(f"{tensor.file} ended early: it changed while it was read")
                filled += count
    values = out.view(STORED_DTYPES[tensor.dtype]).reshape(*shape[:axis], width, *shape[axis + 1 :])
    array = mx.array(values)
    return array.view(mx.bfloat16) if tensor.dtype == "BF16" else array


def _scalar(tensor: StoredTensor) -> mx.array:
    with _open(tensor.file) as handle:
        handle.seek(tensor.start)
        raw = handle.read(tensor.itemsize)
    array = mx.array(np.frombuffer(raw, STORED_DTYPES[tensor.dtype]).reshape(()))
    return array.view(mx.bfloat16) if tensor.dtype == "BF16" else array


def _open(file: Path):
    try:
        return open(file, "rb", buffering=0)
    except OSError as err:
        raise MimoError(f"cannot read {file} ({err.strerror or err})") from None


def _stored(file: Path, key: str, info: object, data_start: int) -> StoredTensor:
    try:
        dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
    except (TypeError, KeyError, ValueError) as err:
        raise MimoError(f"{file}: the header entry of {key} is malformed ({err})") from None
    if dtype not in STORED_DTYPES:
        raise MimoError(f"{file}: tensor {key} has dtype {dtype}, which mimo-mlx cannot load")
    tensor = StoredTensor(file, dtype, shape, data_start + begin)
    if end - begin != math.prod(shape) * tensor.itemsize:
        raise MimoError(f"{file}: tensor {key} has {end - begin} bytes for shape {list(shape)}")
    return tensor


def _mlx_shape(name: str, tensor: StoredTensor, layout: str) -> tuple[int, ...]:
    # The layout rule is shared with the loader; on a lazy array it costs nothing.
    return tuple(to_mlx_layout(name, mx.zeros(tensor.shape, mx.uint8), layout).shape)


def _refuse_conversion(repo_id: str, target: Path) -> None:
    raise MimoError(
        f"{repo_id} has not been converted on this host ({target} is missing). Under mlx.launch "
        "every rank reads its part from a converted folder: run `mimo-mlx convert --hf-path "
        f"{repo_id} --mlx-path FOLDER` on each host (or `mimo-mlx generate` once without "
        "mlx.launch), then pass --model FOLDER."
    )
