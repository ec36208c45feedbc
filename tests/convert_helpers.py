"""Tiny complete checkpoints (weights, tokenizer, preprocessor) for the converter's tests."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from tiny_models import build_ids, mlx_logits, pixels, save_checkpoint, tiny_hf_model
from tiny_tokenizer import build_tiny_tokenizer

from mimo_mlx import load_model

# Every Linear's input width divides by 64, so at the default group size all of them quantize
# except the patch embedding (1176 wide).
WIDE = dict(text=dict(intermediate_size=128), vision=dict(hidden_size=64, intermediate_size=128))
PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "min_pixels": 3136,
    "max_pixels": 200704,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}
# The stated bound: relative RMS of (quantized - float) logits over a prompt with text and an image,
# ||q - f|| / ||f||. Affine g64 rounding perturbs a Gaussian weight by ~9% RMS at 4 bits and ~0.55%
# at 8; about a dozen quantized matmuls lie on each path (vision blocks, merger, decoder, head), so
# errors compound to sqrt(12) x that: ~0.3 and ~0.02 (measured 0.39 and 0.026 on this model).
LOGIT_BOUNDS = {8: 0.05, 4: 0.6}
SIDE_FILES = {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}
SIDE_FILES |= {"preprocessor_config.json"}


def make_source(
    folder: Path,
    seed: int = 3,
    config_layout: str = "text_config",
    key_layout: str = "model",
    wide: bool = True,
    tied: bool = False,
    dtype: str = "float32",
) -> Path:
    """A tiny random Qwen2.5-VL checkpoint folder as published ones are: weights and side files,
    saved in `dtype` (MiMo-VL's is bfloat16) and saying so in config.json, as transformers does."""
    sizes = WIDE if wide else {}
    text = {**sizes.get("text", {}), **({"tie_word_embeddings": True} if tied else {})}
    model = tiny_hf_model(seed=seed, text=text, vision=sizes.get("vision"))
    model = model.to(getattr(torch, dtype))
    save_checkpoint(model, folder, config_layout=config_layout, key_layout=key_layout)
    build_tiny_tokenizer(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    return folder


def split_shards(folder: Path, parts: int = 2) -> list[str]:
    """Rewrite model.safetensors as `parts` shards with an index, as large checkpoints ship."""
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    keys = sorted(tensors)
    size = math.ceil(len(keys) / parts)
    names = [f"model-{i + 1:05d}-of-{parts:05d}.safetensors" for i in range(parts)]
    weight_map = {}
    for i, name in enumerate(names):
        chunk = {k: tensors[k] for k in keys[i * size : (i + 1) * size]}
        save_file(chunk, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return names


def edit_tensors(file: Path, change) -> None:
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def stored(folder: Path) -> dict[str, mx.array]:
    """Every tensor of a converted folder, by name."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(file)))
    return out


def sample_inputs(seed: int = 0) -> dict:
    """Text, an image, more text: exercises embedding, vision tower, merger, decoder and head."""
    rng = np.random.default_rng(seed)
    ids = build_ids([("text", 5), ("image", (1, 4, 8)), ("text", 7)], rng)
    grid = np.array([[1, 4, 8]])
    return dict(input_ids=ids, pixel_values=pixels(grid, rng), image_grid_thw=grid)


def logits(folder: Path, inputs: dict) -> np.ndarray:
    inputs = dict(inputs)
    return np.array(
        mlx_logits(load_model(folder, dtype="float32"), inputs.pop("input_ids"), **inputs)
    )


def relative_rms(actual: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(actual - reference) / np.linalg.norm(reference))


def leftovers(parent: Path, name: str) -> list[str]:
    """Anything a conversion to parent/name left behind (the target itself or a temp folder)."""
    return sorted(
        p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}")
    )


def make_slow_source(folder: Path, vocab_size: int = 1 << 18) -> Path:
    """A tiny model with a large vocabulary: its embedding and head (64 MB each in float32) keep
    the converter busy for a good part of a second, long enough to signal a real process midway."""
    make_source(folder, wide=False)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["vocab_size"] = vocab_size
    (folder / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    large = ("model.embed_tokens.weight", "lm_head.weight")
    edit_tensors(
        folder / "model.safetensors",
        lambda t: t.update({k: rng.standard_normal((vocab_size, 64), np.float32) for k in large}),
    )
    return folder
