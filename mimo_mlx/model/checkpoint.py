"""A model folder on disk: its config.json, its safetensors shards (never pickles), quantized
layers rebuilt as stored, and the check that every weight fits the model. Shared by the loader,
the converter and the sharded loader.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import MimoError
from .mimo_vl import Model
from .weights import canonical_key

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_FILE = "model.safetensors.index.json"


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


def read_safetensors(folder: Path, config: dict[str, Any] | None = None) -> dict[str, mx.array]:
    """Every tensor of the folder's shards. `config` (its config.json) says where the folder came
    from, and so what to do about a damaged file."""
    weights: dict[str, mx.array] = {}
    for file in safetensors_files(folder):
        check_readable(file)
        try:
            shard = mx.load(str(file))
        except Exception as err:  # MLX raises plain runtime errors for truncated or corrupt files
            found = str(err).split(" Perhaps ")[0].rstrip(".")  # MLX's guess, "a download", goes
            raise MimoError(
                f"{file} is damaged or incomplete ({found}); {remedy(folder, config or {})}"
            ) from None
        clash = weights.keys() & shard.keys()
        if clash:
            raise MimoError(
                f"{file.name} repeats tensors found in another shard: {sorted(clash)[:3]}"
            )
        weights.update(shard)
    return weights


def check_readable(file: Path) -> None:
    """A file this user may not read says so (MLX would only say it could not open it)."""
    try:
        file.open("rb").close()
    except PermissionError:
        mode = file.stat().st_mode & 0o777
        raise MimoError(
            f"cannot read {file}: this user has no permission to read it (mode {mode:o}); give "
            "read access (chmod a+r) or run as its owner"
        ) from None
    except OSError as err:
        raise MimoError(f"cannot read {file}: {err.strerror or err}") from None


def remedy(
    folder: Path,
    config: dict[str, Any],
    otherwise: str = "download it again (or convert it again, if you converted it yourself)",
) -> str:
    """What to do about a damaged weight file: a folder `mimo-mlx convert` wrote is converted
    again, one `mimo-mlx random-model` wrote is written again; anything else came from a
    download (or another tool's conversion): `otherwise` says what to do then."""
    if isinstance(config.get("mimo_mlx"), dict):
        return f"{folder} was written by mimo-mlx convert: convert it again (--force replaces it)"
    if "random_weights" in config:
        return (
            f"{folder} was written by mimo-mlx random-model: write it again (mimo-mlx "
            "random-model NEW_FOLDER)"
        )
    return otherwise


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
