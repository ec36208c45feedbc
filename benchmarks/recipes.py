"""The 4-bit variants, made in memory from a float folder with each converter's default recipe.

Converting a full-size checkpoint to disk twice takes longer than a lent GPU machine gives, so each
4-bit worker quantizes the float folder it is given as it loads, on the device it measures:

- `mimo_4bit`: what `mimo-mlx convert` writes: its plan (convert/plan.py: every Linear and
  Embedding whose input width divides by the group, 4 bits, group 64, affine, everything else in
  the checkpoint's float type) and its quantizing function (convert/quantize.py: float32 rows in,
  scales and biases stored in the checkpoint's float type), with the vision tower and merger kept
  in float (`--vision-bits float --merger-bits float`), as mlx-vlm keeps them.
- `mlx_vlm_4bit`: what `mlx_vlm.convert(quantize=True)` writes by default: the parameters cast to
  config.json's torch_dtype, then mlx-vlm's `quantize_model` with convert's default predicate
  (every quantizable module outside the vision tower; 4 bits, group 64, affine).

Both quantize the same bfloat16 numbers the same way, so the two runtimes hold identical 4-bit
weights; `fingerprint` lets each worker report what it holds, so the report can say so.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mimo_mlx.convert.plan import build_plan, make_options, quantization_config
from mimo_mlx.convert.quantize import MX_DTYPES, quantize_weight
from mimo_mlx.convert.source import open_checkpoint
from mimo_mlx.loading import model_from_weights
from mimo_mlx.model.checkpoint import read_safetensors
from mimo_mlx.model.mimo_vl import Model
from mimo_mlx.model.weights import canonical_key, to_mlx_layout

MIMO_4BIT = "mimo-mlx-4bit"
MLX_VLM_4BIT = "mlx-vlm-4bit"
RECIPES = (MIMO_4BIT, MLX_VLM_4BIT)
BITS, GROUP_SIZE = 4, 64  # both converters' defaults


def mimo_4bit(folder: Path, dtype: str | None = None) -> Model:
    """mimo-mlx's 4-bit model of the float checkpoint in `folder`, quantized in memory one tensor
    at a time (the float model is never whole in memory), floats then cast to `dtype`."""
    checkpoint = open_checkpoint(folder)
    options = make_options(BITS, GROUP_SIZE, False, None, "float", "float")
    options = replace(options, dtype=checkpoint.dtype)
    plans = build_plan(
        checkpoint.model_config, checkpoint.tensors, checkpoint.layout, options, folder
    )
    source = read_safetensors(folder)  # lazy: each tensor is read when evaluated
    weights = {}
    for plan in plans:
        rows = source.pop(plan.source.key).astype(mx.float32)
        rows = to_mlx_layout(plan.name, rows, checkpoint.layout)
        if plan.quant is not None:
            arrays = quantize_weight(rows, plan.quant, plan.outputs[-1].dtype)
        else:
            arrays = (rows.astype(MX_DTYPES[plan.outputs[0].dtype]),)
        mx.eval(arrays)
        weights.update({t.name: a for t, a in zip(plan.outputs, arrays, strict=True)})
    raw = {**checkpoint.config, "quantization": quantization_config(plans, options)}
    return model_from_weights(raw, weights, folder, dtype=dtype)


def mlx_vlm_4bit(folder: Path, dtype: str | None = None) -> nn.Module:
    """mlx-vlm's 4-bit model of the float checkpoint in `folder`, as `mlx_vlm.convert` makes it
    with its defaults (cast, then quantize), floats then cast to `dtype`; lazy."""
    from mlx.utils import tree_map_with_path
    from mlx_vlm.quant_utils import quantize_model
    from mlx_vlm.utils import MODEL_CONVERSION_DTYPES, load_model, skip_multimodal_module

    from .runners.mlx_common import cast_floats

    model = load_model(Path(folder), lazy=True)
    config = json.loads((Path(folder) / "config.json").read_text())
    stored = config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    if stored in MODEL_CONVERSION_DTYPES:  # convert's first step: every float in torch_dtype
        target = getattr(mx, stored)
        keep = getattr(model, "cast_predicate", lambda _: True)
        model.update(
            tree_map_with_path(
                lambda k, v: (
                    v.astype(target) if keep(k) and mx.issubdtype(v.dtype, mx.floating) else v
                ),
                model.parameters(),
            )
        )
    own = getattr(model, "quant_predicate", None)

    def predicate(path: str, module: nn.Module):  # convert's base_quant_predicate
        if skip_multimodal_module(path):
            return False
        return own(path, module) if own is not None else True

    config.setdefault("vision_config", {})
    quantize_model(model, config, GROUP_SIZE, BITS, mode="affine", quant_predicate=predicate)
    if dtype is not None:
        cast_floats(model, dtype)
    return model


def quantized_arrays(model: nn.Module) -> dict[str, mx.array]:
    """Every quantized layer's packed weight, scales and biases under this package's names
    (mlx-vlm's `language_model.model.*` read as `model.*`)."""
    flat = dict(tree_flatten(model.parameters()))
    modules = {k.removesuffix(".scales") for k in flat if k.endswith(".scales")}
    return {
        canonical_key(f"{module}.{part}"): flat[f"{module}.{part}"]
        for module in modules
        for part in ("weight", "scales", "biases")
        if f"{module}.{part}" in flat
    }


def fingerprint(model: nn.Module) -> str | None:
    """A digest of every quantized array's exact bits (None: nothing is quantized). Two models
    share it when they hold the same quantized weights under the same names in the same dtypes."""
    arrays = quantized_arrays(model)
    if not arrays:
        return None
    names = sorted(arrays)
    sums = [_bit_sum(arrays[name]) for name in names]
    mx.eval(sums)
    digest = hashlib.sha256()
    for name, total in zip(names, sums, strict=True):
        array = arrays[name]
        digest.update(f"{name} {array.dtype} {tuple(array.shape)} {total.item()}\n".encode())
    return digest.hexdigest()[:16]


def _bit_sum(array: mx.array) -> mx.array:
    """The sum of the array's raw bits as unsigned integers, modulo 2**32: exact, and the same in
    any summation order."""
    bits = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32}[array.dtype.size]
    return mx.sum(array.view(bits).astype(mx.uint32))  # an unsigned sum wraps: exact mod 2**32
