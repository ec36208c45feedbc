"""Config parsing: both layouts, MiMo-VL-7B defaults, validation messages that name the field."""

from __future__ import annotations

import copy

import pytest
from mlx.utils import tree_flatten

from mimo_mlx import MimoError, Model, ModelConfig

# MiMo-VL-7B-RL's config.json as published (decoder keys at the root, rope_scaling with mrope).
PUBLISHED = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "image_token_id": 151655,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 128000,
    "max_window_layers": 36,
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
    "rope_theta": 640000,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "video_token_id": 151656,
    "vision_end_token_id": 151653,
    "vision_start_token_id": 151652,
    "vision_token_id": 151654,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3456,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 4096,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
        "model_type": "qwen2_5_vl",
    },
    "vocab_size": 151680,
}


def text_config_layout() -> dict:
    """The same model as transformers 5 writes it."""
    config = {k: v for k, v in PUBLISHED.items() if k in ("architectures", "model_type")}
    text_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    text_keys += ("num_key_value_heads", "rms_norm_eps", "vocab_size", "max_position_embeddings")
    config["text_config"] = {k: PUBLISHED[k] for k in text_keys} | {
        "model_type": "qwen2_5_vl_text",
        "hidden_act": "silu",
        "eos_token_id": 151645,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 640000.0,
            "mrope_section": [16, 24, 24],
        },
    }
    config["vision_config"] = dict(PUBLISHED["vision_config"], model_type="qwen2_5_vl_vision")
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        config[key] = PUBLISHED[key]
    return config


@pytest.mark.parametrize("raw", [PUBLISHED, text_config_layout()], ids=["root", "text_config"])
def test_both_layouts_give_mimo_vl_7b_which_is_the_default(raw):
    assert ModelConfig.from_hf(raw) == ModelConfig()


def test_real_shapes_hold_the_published_parameter_count():
    # 8,306,217,216 parameters in the bf16 checkpoint; building the model allocates nothing (lazy).
    params = dict(tree_flatten(Model(ModelConfig()).parameters()))
    assert sum(v.size for v in params.values()) == 8_306_217_216
    merger = sum(v.size for k, v in params.items() if k.startswith("visual.merger."))
    assert merger == 47_196_416


def test_the_callers_dict_is_never_mutated():
    raw = copy.deepcopy(PUBLISHED)
    ModelConfig.from_hf(raw)
    assert raw == PUBLISHED


def broken(path: str, value) -> dict:
    raw = copy.deepcopy(PUBLISHED)
    *parents, leaf = path.split(".")
    node = raw
    for key in parents:
        node = node[key]
    if value is None:
        del node[leaf]
    else:
        node[leaf] = value
    return raw


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("model_type", "llama", "model_type is 'llama'"),
        ("vision_config", None, "vision_config is missing"),
        ("rope_scaling", None, "rope_parameters \\(or rope_scaling\\)"),
        ("rope_scaling.mrope_section", [16, 24], "rope_scaling.mrope_section"),
        ("rope_scaling.mrope_section", [16, 24, 20], "must sum to half the head dim"),
        ("hidden_size", "4096", "hidden_size must be int"),
        ("num_key_value_heads", 5, "not a multiple of num_key_value_heads 5"),
        ("vision_config.depth", 0, "vision_config.depth must be positive"),
        ("vision_config.fullatt_block_indexes", [7, 40], "fullatt_block_indexes \\[40\\]"),
        ("vision_config.window_size", 100, "window_size 100"),
        ("vision_config.out_hidden_size", 3584, "out_hidden_size 3584"),
        ("hidden_act", "gelu", "hidden_act 'gelu'"),
    ],
)
def test_validation_names_the_field(path, value, message):
    with pytest.raises(MimoError, match=message):
        ModelConfig.from_hf(broken(path, value))
