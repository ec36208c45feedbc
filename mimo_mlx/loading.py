"""Load a model folder: HF safetensors, an mlx-vlm conversion, or a `mimo-mlx convert` output.

May import: errors, options, model, inputs, convert.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from .errors import MimoError
from .inputs.processor import Processor
from .model.checkpoint import check_weights, quantize_like, read_config, read_safetensors
from .model.config import ModelConfig
from .model.mimo_vl import Model
from .model.weights import detect_layout, sanitize
from .options import DEFAULT_MODEL

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def load(
    path_or_hf_repo: str | Path = DEFAULT_MODEL,
    revision: str | None = None,
    dtype: str | mx.Dtype | None = None,
    lazy: bool = False,
    on_convert: Callable[[str, Path], None] | None = None,
) -> tuple[Model, Processor]:
    """(model, processor) for a model folder or a Hugging Face repo id (at `revision`).

    A repo id is converted to 4-bit MLX once, into the mimo-mlx cache (`on_convert` is told first),
    and loaded from there afterwards. On the CPU, floating-point weights are computed in float32
    (MLX's CPU half-precision math is scalar and slow) unless `dtype` says otherwise. With `lazy`,
    weights are read only when first used.
    """
    folder = resolve_model(path_or_hf_repo, revision, on_convert)
    dtype = dtype if dtype is not None else default_dtype()
    return load_model(folder, dtype=dtype, lazy=lazy), Processor.from_folder(folder)


def default_dtype() -> str | None:
    return "float32" if mx.default_device() == mx.cpu else None


def cache_home() -> Path:
    """Where converted hub models live: $MIMO_MLX_HOME, else ~/.cache/mimo-mlx."""
    return Path(os.environ.get("MIMO_MLX_HOME", Path.home() / ".cache" / "mimo-mlx"))


def converted_path(repo_id: str, revision: str | None = None, bits: int = 4) -> Path:
    at = "@" + re.sub(r"[^\w.-]", "_", revision) if revision else ""
    return cache_home() / "models" / f"{repo_id.replace('/', '--')}{at}-{bits}bit"


def looks_like_path(name: str) -> bool:
    """Whether the user meant a folder: starts with '.', '/' or '~', or names an existing parent."""
    if name.startswith((".", "/", "~")) or "\\" in name:
        return True
    parent = Path(name).parent
    return str(parent) not in ("", ".") and parent.expanduser().is_dir()


def resolve_model(
    model: str | Path,
    revision: str | None = None,
    on_convert: Callable[[str, Path], None] | None = None,
) -> Path:
    """The folder for `model`: itself if it exists, else its cached conversion (made if missing)."""
    path = Path(model).expanduser()
    if path.exists():
        if revision is not None:
            raise MimoError(f"revision {revision!r} pins a hub repo; {model} is a local folder")
        return path
    name = str(model)
    if isinstance(model, Path) or looks_like_path(name):
        raise MimoError(f"model folder not found: {name}")
    if not _REPO_ID.match(name):
        raise MimoError(f"{name} is neither a model folder nor a Hugging Face repo id (org/name)")
    target = converted_path(name, revision)
    if target.is_dir():
        return target
    if on_convert is not None:
        on_convert(name, target)
    from .convert import convert  # noqa: PLC0415  (only needed the first time)

    convert(hf_path=name, mlx_path=target, revision=revision)
    return target


def load_model(path: str | Path, dtype: str | mx.Dtype | None = None, lazy: bool = False) -> Model:
    """The model in `path` (a folder with config.json and safetensors), weights checked and loaded.

    `dtype` casts floating-point weights (e.g. "float32" for the CPU); None keeps them as stored.
    Quantized layers are rebuilt wherever the folder holds quantized weights. With `lazy`, weights
    are read only when first used (or evaluated), so a caller can materialize part of the model.
    """
    folder = Path(path)
    raw = read_config(folder)
    config = ModelConfig.from_hf(raw)
    weights = read_safetensors(folder, raw)
    weights = sanitize(weights, detect_layout(weights, raw), config.text.tie_word_embeddings)
    return model_from_weights(raw, weights, folder, dtype=dtype, lazy=lazy)


def model_from_weights(
    raw: dict,
    weights: dict[str, mx.array],
    where: Path,
    dtype: str | mx.Dtype | None = None,
    lazy: bool = False,
) -> Model:
    """The model for config.json's contents `raw` and `weights` already under this package's names
    and layouts (quantized ones with their scales and biases, as `raw["quantization"]` says),
    checked as `load_model` checks a folder (`where` names the weights in its messages)."""
    model = Model(ModelConfig.from_hf(raw))
    quantize_like(model, weights, raw.get("quantization"))
    check_weights(model, weights, where)
    if dtype is not None:
        target = DTYPES[dtype] if isinstance(dtype, str) else dtype
        weights = {
            k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()
        }
    model.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(model.parameters())
    return model
