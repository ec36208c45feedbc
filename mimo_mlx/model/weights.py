"""Checkpoint names and layouts -> this package's, as pure functions shared by the loader and converter.

Three on-disk layouts are understood, named explicitly rather than guessed from shapes:

- "hf": transformers checkpoints, `model.*` + `visual.*` + `lm_head.*`, or the newer
  `model.language_model.*` + `model.visual.*`; the patch embedding is a torch Conv3d (out, 3, 2, 14, 14).
- "mlx-vlm": mlx-community conversions, `language_model.model.*`, `language_model.lm_head.*`,
  `vision_tower.*`; the patch embedding is an MLX Conv3d (out, 2, 14, 14, 3).
- "mimo-mlx": folders written by `mimo-mlx convert`: already in this package's names and layouts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import mlx.core as mx

HF, MLX_VLM, MIMO_MLX = "hf", "mlx-vlm", "mimo-mlx"

# Anchored: only a key's prefix is ever rewritten.
_RENAMES = (
    (re.compile(r"^model\.language_model\."), "model."),
    (re.compile(r"^model\.visual\."), "visual."),
    (re.compile(r"^language_model\.model\."), "model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^vision_tower\."), "visual."),
)
# Buffers some exports carry that hold no learned weights.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$|(^|\.)rotary_pos_emb\.inv_freq$")
PATCH_EMBED = "visual.patch_embed.proj.weight"


def detect_layout(keys: Iterable[str], config: dict) -> str:
    """Which of the three layouts a checkpoint uses, from its config and key prefixes."""
    if "mimo_mlx" in config:
        return MIMO_MLX
    if any(k.startswith(("language_model.", "vision_tower.")) for k in keys):
        return MLX_VLM
    return HF


def canonical_key(key: str) -> str:
    """A checkpoint key in this package's names (`model.*`, `visual.*`, `lm_head.*`)."""
    for pattern, replacement in _RENAMES:
        if pattern.match(key):
            return pattern.sub(replacement, key, count=1)
    return key


def is_ignored(key: str) -> bool:
    return bool(_IGNORED.search(key))


def to_mlx_layout(key: str, value: mx.array, layout: str) -> mx.array:
    """One tensor, already under its canonical key, in the layout the MLX modules expect."""
    if key == PATCH_EMBED and value.ndim == 5:
        if layout == MLX_VLM:
            value = value.transpose(0, 4, 1, 2, 3)  # (out, T, P, P, C) -> (out, C, T, P, P)
        # Flattened (C, T, P, P) is exactly the order of a preprocessed 1176-long patch vector.
        return value.reshape(value.shape[0], -1)
    return value


def sanitize(
    weights: dict[str, mx.array], layout: str, tie_word_embeddings: bool
) -> dict[str, mx.array]:
    """All tensors of a checkpoint renamed and re-laid-out for `Model`; idempotent."""
    out = {}
    for key, value in weights.items():
        if is_ignored(key):
            continue
        name = canonical_key(key)
        if tie_word_embeddings and name.startswith("lm_head."):
            continue  # the tied head is the embedding itself
        out[name] = to_mlx_layout(name, value, layout)
    return out
