"""What becomes of each checkpoint tensor: its name and shape in MLX, its part, and how it is stored.

Everything here is decided from safetensors headers and the model's lazily built parameters, before a
single weight is read, so a checkpoint that does not fit the config fails in seconds, not after hours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mimo_mlx.errors import MimoError
from mimo_mlx.model.checkpoint import check_weights
from mimo_mlx.model.config import ModelConfig
from mimo_mlx.model.mimo_vl import Model
from mimo_mlx.model.weights import canonical_key, is_ignored, to_mlx_layout

from .reader import SourceTensor

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
FLOAT_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
PARTS = ("vision", "merger", "decoder")
MODE = "affine"


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int

    def as_config(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": MODE}


@dataclass(frozen=True)
class Options:
    """How each part is stored: a QuantSpec, or None to keep it in floating point (`dtype`)."""

    dtype: str | None  # None until the checkpoint's own type is known
    parts: dict[str, QuantSpec | None]

    @property
    def quantized(self) -> bool:
        return any(spec is not None for spec in self.parts.values())


def make_options(
    q_bits: int,
    q_group_size: int,
    no_quantize: bool,
    dtype: str | None,
    vision_bits: int | str | None,
    merger_bits: int | str | None,
) -> Options:
    """Validated options; every message names the command-line flag it is about. A `dtype` of
    None stands for the checkpoint's own, which the caller fills in once it has read it."""
    if q_bits not in SUPPORTED_BITS:
        raise MimoError(
            f"--q-bits {q_bits} is not supported: choose one of {_listed(SUPPORTED_BITS)}"
        )
    if q_group_size not in SUPPORTED_GROUP_SIZES:
        raise MimoError(
            f"--q-group-size {q_group_size} is not supported: choose one of "
            f"{_listed(SUPPORTED_GROUP_SIZES)}"
        )
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise MimoError(f"--dtype {dtype} is not supported: choose one of {_listed(FLOAT_DTYPES)}")
    if no_quantize and (vision_bits is not None or merger_bits is not None):
        raise MimoError("--no-quantize keeps every part in float; drop --vision-bits/--merger-bits")
    default = None if no_quantize else QuantSpec(q_bits, q_group_size)
    parts = {
        "decoder": default,
        "vision": _part_spec("--vision-bits", vision_bits, default, q_group_size),
        "merger": _part_spec("--merger-bits", merger_bits, default, q_group_size),
    }
    return Options(dtype=dtype, parts=parts)


def _part_spec(flag: str, value: int | str | None, default: QuantSpec | None, group: int):
    if value is None:
        return default
    if str(value).lower() == "float":
        return None
    try:
        bits = int(value)
    except (TypeError, ValueError):
        bits = None
    if bits not in SUPPORTED_BITS:
        raise MimoError(
            f"{flag} {value} is not supported: choose one of {_listed(SUPPORTED_BITS)} or float"
        )
    return QuantSpec(bits, group)


def _listed(values) -> str:
    return ", ".join(str(v) for v in values)


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str  # safetensors dtype: U32, F16, BF16, F32
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * (4 if self.dtype in ("U32", "F32") else 2)


@dataclass(frozen=True)
class TensorPlan:
    """One checkpoint tensor: where it comes from and the tensors it becomes."""

    source: SourceTensor
    name: str  # canonical (`model.*`, `visual.*`, `lm_head.*`)
    shape: tuple[int, ...]  # MLX layout
    part: str
    quantizable: bool  # the weight of a Linear or Embedding
    quant: QuantSpec | None  # None: stored in float
    outputs: tuple[OutputTensor, ...]


def part_of(name: str) -> str:
    if name.startswith("visual.merger."):
        return "merger"
    return "vision" if name.startswith("visual.") else "decoder"


def build_plan(
    config: ModelConfig,
    tensors: dict[str, SourceTensor],
    layout: str,
    options: Options,
    where: Path,
) -> list[TensorPlan]:
    """The plan for every tensor kept, in file order; raises if the checkpoint does not fit `config`
    (`where` names the checkpoint in that message)."""
    model = Model(config)  # parameters are lazy arrays: building even the 7B model costs nothing
    kept = {}
    for key, source in sorted(tensors.items(), key=lambda kv: (str(kv[1].file), kv[1].start)):
        name = canonical_key(key)
        if is_ignored(key) or (config.text.tie_word_embeddings and name.startswith("lm_head.")):
            continue
        if name in kept:
            raise MimoError(f"{where}: {key} and {kept[name][0].key} are the same weight ({name})")
        kept[name] = (source, _mlx_shape(name, source, layout))
    check_weights(model, {name: _Shaped(shape) for name, (_, shape) in kept.items()}, where)
    modules = {path for path, m in model.named_modules() if isinstance(m, nn.Linear | nn.Embedding)}
    dtype = FLOAT_DTYPES[options.dtype]
    plans = []
    for name, (source, shape) in kept.items():
        part = part_of(name)
        quantizable = name.endswith(".weight") and name.removesuffix(".weight") in modules
        spec = options.parts[part] if quantizable else None
        if spec is not None and shape[-1] % spec.group_size:
            spec = None  # e.g. the patch embedding's 1176 inputs do not split into groups
        outputs = _outputs(name, shape, spec, dtype)
        plans.append(TensorPlan(source, name, shape, part, quantizable, spec, outputs))
    return plans


class _Shaped:
    """Stands in for an array in `check_weights`, which only looks at shapes."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape


def _mlx_shape(name: str, source: SourceTensor, layout: str) -> tuple[int, ...]:
    if len(source.shape) < 2:
        return source.shape
    # The layout rule is shared with the loader; on a lazy one-row array it costs nothing.
    row = to_mlx_layout(name, mx.zeros((1, *source.shape[1:])), layout)
    return (source.shape[0], *row.shape[1:])


def _outputs(name, shape, spec: QuantSpec | None, dtype: str) -> tuple[OutputTensor, ...]:
    if spec is None:
        return (OutputTensor(name, dtype, shape),)
    module = name.removesuffix(".weight")
    rows, width = shape
    return (
        OutputTensor(name, "U32", (rows, width * spec.bits // 32)),
        OutputTensor(f"{module}.scales", dtype, (rows, width // spec.group_size)),
        OutputTensor(f"{module}.biases", dtype, (rows, width // spec.group_size)),
    )


def quantization_config(plans: list[TensorPlan], options: Options) -> dict | None:
    """config.json's `quantization`: the default, plus an entry for each Linear/Embedding stored
    otherwise (mlx-lm's convention: parameters when they differ, `false` when it stays float)."""
    specs = [p.quant for p in plans if p.quant is not None]
    if not specs:
        return None
    default = options.parts["decoder"] or specs[0]
    section: dict = default.as_config()
    for plan in plans:
        if not plan.quantizable:
            continue
        module = plan.name.removesuffix(".weight")
        if plan.quant is None:
            section[module] = False
        elif plan.quant != default:
            section[module] = plan.quant.as_config()
    return section
