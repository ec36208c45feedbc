"""Tiny random Qwen2.5-VL checkpoints built in-process with transformers, in every on-disk layout.

Every parameter (weights, biases, norm scales) is drawn at random so a missing bias or norm shows up
in the logits; transformers' default init would leave biases at zero and norms at one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from tiny_tokenizer import SPECIAL_TOKEN_IDS, TINY_TOTAL_VOCAB
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

# The tiny tokenizer's special ids, so tiny models and tiny tokenizers work together.
TOKENS = dict(
    image_token_id=SPECIAL_TOKEN_IDS["<|image_pad|>"],
    video_token_id=SPECIAL_TOKEN_IDS["<|video_pad|>"],
    vision_start_token_id=SPECIAL_TOKEN_IDS["<|vision_start|>"],
    vision_end_token_id=SPECIAL_TOKEN_IDS["<|vision_end|>"],
)
TEXT = dict(
    vocab_size=TINY_TOTAL_VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    bos_token_id=None,
    eos_token_id=SPECIAL_TOKEN_IDS["<|im_end|>"],
    pad_token_id=None,
)
ROPE = dict(rope_theta=640000.0, mrope_section=[2, 3, 3])  # head_dim 16: 2 * (2+3+3)
# Head dimension 64 (MiMo-VL's is 128): wide enough for a quantized KV cache's groups of 32 and 64,
# with grouped-query attention (2 query heads a key/value head) that splits across 2 ranks.
WIDE_HEADS = dict(
    text=dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2),
    vision=dict(out_hidden_size=256),
    rope=dict(mrope_section=[8, 12, 12]),
)
VISION = dict(
    depth=4,
    hidden_size=32,
    intermediate_size=48,
    num_heads=2,
    out_hidden_size=64,
    window_size=112,
    fullatt_block_indexes=[1, 3],
    tokens_per_second=2,
    spatial_merge_size=2,
    patch_size=14,
    temporal_patch_size=2,
)


def tiny_hf_model(
    seed: int = 0, text=None, vision=None, rope=None
) -> Qwen2_5_VLForConditionalGeneration:
    rope = {**ROPE, **(rope or {})}
    config = Qwen2_5_VLConfig(
        text_config={
            **TEXT,
            **(text or {}),
            "rope_parameters": {"rope_type": "default", **rope},
        },
        vision_config={**VISION, **(vision or {})},
        **TOKENS,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
            else:
                fan_in = param[0].numel()
                param.copy_(torch.randn_like(param) / fan_in**0.5)
    return model


def save_checkpoint(
    model: Qwen2_5_VLForConditionalGeneration,
    folder: Path,
    config_layout: str = "text_config",
    key_layout: str = "model",
) -> Path:
    """Save as transformers does, then rewrite into the requested layouts.

    config_layout: "text_config" (transformers 5) or "root" (published checkpoints: decoder keys at the
    root, `rope_scaling` with type mrope). key_layout: "model" (`model.*` + `visual.*`) or
    "language_model" (`model.language_model.*` + `model.visual.*`).
    """
    model.save_pretrained(folder)
    if config_layout == "root":
        _flatten_config(folder / "config.json")
    if key_layout == "language_model":
        _rename_keys(folder)
    return folder


def _flatten_config(path: Path) -> None:
    config = json.loads(path.read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    text.pop("model_type")
    config.update(text)
    config["rope_theta"] = rope["rope_theta"]
    config["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    config["vision_config"]["model_type"] = "qwen2_5_vl"
    config["vision_config"].pop("rope_parameters", None)
    path.write_text(json.dumps(config, indent=2))


def _rename_keys(folder: Path) -> None:
    for file in folder.glob("*.safetensors"):
        tensors = load_file(file)
        renamed = {}
        for key, value in tensors.items():
            if key.startswith("model."):
                key = "model.language_model." + key[len("model.") :]
            elif key.startswith("visual."):
                key = "model." + key
            renamed[key] = value
        save_file(renamed, file, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    assert not index.exists(), "tiny checkpoints are a single shard"


def build_ids(parts, rng: np.random.Generator, merge: int = 2) -> np.ndarray:
    """Token ids (1, L) from parts: ("text", n) random text tokens, ("image"|"video", (t, h, w))."""
    ids: list[int] = []
    for kind, value in parts:
        if kind == "text":
            ids += rng.integers(0, 390, size=value).tolist()  # ordinary text tokens
        else:
            t, h, w = value
            pad = TOKENS["image_token_id"] if kind == "image" else TOKENS["video_token_id"]
            count = t * h * w // merge**2
            ids += [TOKENS["vision_start_token_id"], *[pad] * count, TOKENS["vision_end_token_id"]]
    return np.array([ids], dtype=np.int64)


def hf_logits(model, ids: np.ndarray, **vision) -> np.ndarray:
    """transformers' logits; mm_token_type_ids is what makes transformers 5 apply 3-D positions."""
    mm = np.zeros_like(ids)
    mm[ids == TOKENS["image_token_id"]] = 1
    mm[ids == TOKENS["video_token_id"]] = 2
    kwargs = {k: torch.tensor(np.asarray(v)) for k, v in vision.items() if v is not None}
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), mm_token_type_ids=torch.tensor(mm), **kwargs)
    return out.logits.numpy()


def mlx_logits(model, ids, cache=None, **vision):
    """The MLX port's logits for a whole prompt: its host work once, then the model's own call."""
    prompt = model.prepare_prompt(ids, **vision, cache=cache)
    return model(**prompt.chunk(), cache=cache)


def pixels(grid_thw, rng: np.random.Generator) -> np.ndarray:
    count = int(np.sum(np.prod(np.asarray(grid_thw).reshape(-1, 3), axis=1)))
    return rng.standard_normal((count, 1176)).astype(np.float32)
