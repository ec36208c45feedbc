"""Folders written by mlx-vlm's converter (the mlx-community format) load with mimo_mlx.load_model.

mlx-vlm runs for real, in-process, on a tiny checkpoint. It quantizes the decoder, embedding and head
but never the vision tower or merger, and keeps float32 weights as float32; our converter with the
same choices must then yield the same model, so the two folders' logits agree to float32 rounding.
"""

from __future__ import annotations

import json

import mlx.nn as nn
import numpy as np
import pytest
from convert_helpers import LOGIT_BOUNDS, logits, make_source, relative_rms, sample_inputs

from mimo_mlx import MimoError, load_model
from mimo_mlx.convert import convert
from mimo_mlx.model.weights import MLX_VLM, detect_layout

mlx_vlm_convert = pytest.importorskip("mlx_vlm.convert").convert


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlx_vlm")
    # mlx-vlm reads the published config layout (decoder keys at the root of config.json).
    source = make_source(root / "src", seed=5, config_layout="root")
    theirs = root / "mlx-vlm-4bit"
    mlx_vlm_convert(
        hf_path=str(source), mlx_path=str(theirs), quantize=True, q_bits=4, q_group_size=64
    )
    return source, theirs


def test_mlx_vlm_folder_is_what_we_expect(folders):
    _, theirs = folders
    config = json.loads((theirs / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    keys = json.loads((theirs / "model.safetensors.index.json").read_text())["weight_map"]
    assert detect_layout(keys, config) == MLX_VLM
    assert "language_model.model.layers.0.mlp.up_proj.scales" in keys
    assert "vision_tower.patch_embed.proj.weight" in keys


def test_mlx_vlm_folder_loads_with_quantized_layers(folders):
    _, theirs = folders
    model = load_model(theirs)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(model.lm_head, nn.QuantizedLinear)
    assert isinstance(model.model.layers[1].self_attn.k_proj, nn.QuantizedLinear)
    assert type(model.visual.blocks[0].attn.qkv) is nn.Linear  # mlx-vlm keeps vision in float
    assert type(model.visual.merger.mlp[0]) is nn.Linear


def test_mlx_vlm_folder_matches_our_conversion(folders, tmp_path):
    source, theirs = folders
    ours = tmp_path / "ours"
    convert(
        hf_path=str(source),
        mlx_path=str(ours),
        vision_bits="float",
        merger_bits="float",
        dtype="float32",
    )
    inputs = sample_inputs(seed=1)
    reference = logits(source, inputs)
    theirs_logits, ours_logits = logits(theirs, inputs), logits(ours, inputs)
    np.testing.assert_allclose(theirs_logits, ours_logits, atol=1e-4, rtol=0)
    assert relative_rms(theirs_logits, reference) < LOGIT_BOUNDS[4]


def test_a_quantized_folder_is_not_converted_again(folders, tmp_path):
    _, theirs = folders
    with pytest.raises(MimoError, match="already quantized"):
        convert(hf_path=str(theirs), mlx_path=str(tmp_path / "again"))
    assert not (tmp_path / "again").exists()
