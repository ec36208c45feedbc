"""Load a model folder: HF safetensors, an mlx-vlm conversion, or a `mimo-mlx convert` output.

May import: errors, options, model, inputs, convert.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import MimoError
from .inputs.processor import Processor
from .model.config import ModelConfig
from .model.mimo_vl import Model
from .model.weights import canonical_key, detect_layout, sanitize
from .options import DEFAULT_MODEL

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_FILE = "model.safetensors.index.json"
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
    weights = read_safetensors(folder)
    weights = sanitize(weights, detect_layout(weights, raw), config.text.tie_word_embeddings)
    model = Model(config)
    quantize_like(model, weights, raw.get("quantization"))
    check_weights(model, weights, folder)
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


def read_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise MimoError(f"{folder} is not a folder; give a model folder or a Hugging Face repo id")
    path = folder / "config.json"
    if not path.is_file():
        raise MimoError(f"{folder} has no config.json, so it is not a model folder")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MimoError(f"{path} is not valid JSON ({err})") from None
    except OSError as err:
        raise MimoError(f"cannot read {path}: {err.strerror or err}") from None


def safetensors_files(folder: Path) -> list[Path]:
    """The weight shards of `folder`, all present; pickled checkpoints are refused, never opened."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise MimoError(f"{index} is not a valid safetensors index ({err})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MimoError(
                f"{folder} is missing weight shards listed in {INDEX_FILE}: {', '.join(missing)}"
            )
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise MimoError(
            f"{folder} only has pickled PyTorch weights ({', '.join(pickles[:3])}); mimo-mlx never "
            "loads pickles because they can run code. Use a checkpoint with .safetensors files."
        )
    raise MimoError(f"{folder} has no .safetensors weight files")


def read_safetensors(folder: Path) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for file in safetensors_files(folder):
        try:
            shard = mx.load(str(file))
        except Exception as err:  # MLX raises plain runtime errors for truncated or corrupt files
            raise MimoError(
                f"{file} could not be read ({err}); it may be truncated: download it again"
            ) from None
        clash = weights.keys() & shard.keys()
        if clash:
            raise MimoError(
                f"{file.name} repeats tensors found in another shard: {sorted(clash)[:3]}"
            )
        weights.update(shard)
    return weights


def quantize_like(model: Model, names: Iterable[str], quantization: dict | None) -> None:
    """Turn into quantized layers exactly the modules whose weights come quantized (have `.scales`
    among the weight `names`, e.g. a dict of arrays or of a file header's entries)."""
    quantized = {key[: -len(".scales")] for key in names if key.endswith(".scales")}
    if not quantized:
        return
    if not isinstance(quantization, dict) or "bits" not in quantization:
        raise MimoError(
            "the weights are quantized but config.json has no quantization section with bits and "
            "group_size; re-run mimo-mlx convert"
        )
    default = {k: quantization[k] for k in ("group_size", "bits", "mode") if k in quantization}
    overrides = {
        canonical_key(f"{path}.weight")[: -len(".weight")]: params
        for path, params in quantization.items()
        if isinstance(params, dict)
    }

    def params_for(path: str, module: nn.Module) -> bool | dict:
        if path not in quantized or not hasattr(module, "to_quantized"):
            return False
        own = overrides.get(path, {})
        return {**default, **{k: own[k] for k in ("group_size", "bits", "mode") if k in own}}

    nn.quantize(model, class_predicate=params_for)


def check_weights(model: Model, weights: dict[str, mx.array], folder: Path) -> None:
    """Every parameter present with its shape, and nothing left over; otherwise say what differs."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    mismatched = [
        f"{k} {tuple(weights[k].shape)} (model expects {tuple(v.shape)})"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    problems = []
    for label, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape", mismatched),
    ):
        if items:
            shown = ", ".join(items[:8]) + (
                f", ... ({len(items)} in all)" if len(items) > 8 else ""
            )
            problems.append(f"{label}: {shown}")
    if problems:
        raise MimoError(
            f"the weights in {folder} do not match its config.json: " + "; ".join(problems)
        )
