"""The harness's weights: the synthetic checkpoint drawn with MLX, the 4-bit variants each worker
makes in memory, and the bytes a decode step reads.

The in-memory 4-bit models must be what each converter writes by default (mimo-mlx's with the
vision tower kept in float, as the harness asks it): checked against the converters' own output
folders at tiny scale, array for array, and against each other (the same quantized weights in
mimo-mlx and mlx-vlm).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from benchmarks.recipes import (
    MIMO_4BIT,
    MLX_VLM_4BIT,
    fingerprint,
    mimo_4bit,
    mlx_vlm_4bit,
    quantized_arrays,
)
from benchmarks.report.bandwidth import decode_read_bytes
from benchmarks.synthetic import checkpoint_shapes, scaled_config, write_checkpoint
from benchmarks.weights import Weights, make_synthetic, plan
from mimo_mlx import load_model

pytest.importorskip("mlx_vlm")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("weights"), "tiny", log=lambda m: None)


def flat(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def test_the_checkpoint_has_the_real_names_and_shapes_and_is_repeatable(source, tmp_path):
    config = json.loads((source / "config.json").read_text())
    shapes = checkpoint_shapes(config)
    weights = {}
    for shard in sorted(source.glob("*.safetensors")):
        weights.update(mx.load(str(shard)))
    assert {k: tuple(v.shape) for k, v in weights.items()} == shapes
    assert all(v.dtype == mx.bfloat16 for v in weights.values())
    index = json.loads((source / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(shapes)
    assert index["metadata"]["total_size"] == 2 * sum(math.prod(s) for s in shapes.values())
    weight = weights["model.layers.0.mlp.down_proj.weight"].astype(mx.float32)
    assert abs(mx.std(weight).item() - 0.02) < 0.002 and abs(mx.mean(weight).item()) < 0.002
    norm = weights["model.layers.0.input_layernorm.weight"].astype(mx.float32)
    assert abs(mx.mean(norm).item() - 1.0) < 0.01
    again = write_checkpoint(
        tmp_path / "again", config=scaled_config("tiny"), max_shard_bytes=1 << 17
    )
    assert again == shapes
    shards = sorted((tmp_path / "again").glob("*.safetensors"))
    assert len(shards) > 1  # the same tensors, split otherwise, hold the same numbers
    other = {}
    for shard in shards:
        other.update(mx.load(str(shard)))
    assert all(mx.array_equal(other[k], weights[k]).item() for k in shapes)


def test_mimo_4bit_in_memory_is_what_the_converter_writes(source, tmp_path):
    from mimo_mlx.convert import convert

    convert(str(source), tmp_path / "conv", vision_bits="float", merger_bits="float")
    written, ours = flat(load_model(tmp_path / "conv")), flat(mimo_4bit(source))
    assert written.keys() == ours.keys()
    for key, array in written.items():
        assert array.dtype == ours[key].dtype and mx.array_equal(array, ours[key]).item(), key
    assert any(k.endswith(".scales") for k in ours) and not any(
        k.startswith("visual.") and k.endswith(".scales") for k in ours
    )


def test_mlx_vlm_4bit_in_memory_is_what_mlx_vlm_convert_writes(source, tmp_path):
    from mlx_vlm.convert import convert
    from mlx_vlm.utils import load_model as load_mlx_vlm

    convert(hf_path=str(source), mlx_path=str(tmp_path / "conv"), quantize=True)
    written = flat(load_mlx_vlm(tmp_path / "conv"))
    ours = flat(mlx_vlm_4bit(source))
    assert written.keys() == ours.keys()
    for key, array in written.items():
        assert array.dtype == ours[key].dtype and mx.array_equal(array, ours[key]).item(), key


def test_both_runtimes_hold_the_same_4bit_weights(source):
    ours, theirs = mimo_4bit(source, "float32"), mlx_vlm_4bit(source, "float32")
    a, b = quantized_arrays(ours), quantized_arrays(theirs)
    assert a.keys() == b.keys() and any(k.startswith("model.layers.") for k in a)
    assert {"lm_head.scales", "model.embed_tokens.scales"} <= a.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and mx.array_equal(a[key], b[key]).item(), key
    assert fingerprint(ours) == fingerprint(theirs) is not None
    scales = ours.model.layers[0].mlp.gate_proj.scales
    bits = np.array(scales.view(mx.uint32))
    bits[0, 0] ^= 1  # one bit of one scale
    ours.model.layers[0].mlp.gate_proj.scales = mx.array(bits).view(mx.float32)
    assert fingerprint(ours) != fingerprint(theirs)
    assert fingerprint(load_model(source)) is None  # nothing quantized


def test_the_plan_quantizes_in_memory_and_never_for_torch(tmp_path):
    folders = plan(tmp_path, "tiny", ["mimo-mlx", "mlx-vlm", "torch"], ["float", "4bit"])
    source = tmp_path / "tiny" / "hf-bf16"
    assert folders.paths[("mimo-mlx", "4bit")] == Weights(source, MIMO_4BIT)
    assert folders.paths[("mlx-vlm", "4bit")] == Weights(source, MLX_VLM_4BIT)
    for runtime in ("mimo-mlx", "mlx-vlm", "torch"):
        assert folders.paths[(runtime, "float")] == Weights(source)
    assert ("torch", "4bit") in folders.skipped and ("torch", "4bit") not in folders.paths
    assert not source.exists()  # planning writes nothing


@pytest.mark.parametrize("quantized", [False, True])
def test_decode_bytes_count_the_arrays_a_step_reads(source, quantized):
    """Every decoder array once (one embedding row), against the loaded model's own arrays."""
    model = mimo_4bit(source, "float32") if quantized else load_model(source, dtype="float32")
    arrays = flat(model)
    embed = {k: v for k, v in arrays.items() if k.startswith("model.embed_tokens.")}
    decoder = sum(v.nbytes for k, v in arrays.items() if not k.startswith("visual.")) - sum(
        v.nbytes - v.nbytes // v.shape[0] for v in embed.values()
    )
    config = json.loads((source / "config.json").read_text())
    found = decode_read_bytes(config, quantized, itemsize=4, positions=10)
    assert found["weights"] == decoder
    text = model.config.text
    assert (
        found["kv_cache"]
        == 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * 10 * 4
    )
