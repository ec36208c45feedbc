"""MiMo-VL (Qwen2.5-VL architecture): vision tower and merger in front of the MiMo-7B decoder.

Attribute names follow the published checkpoint (`model.*`, `visual.*`, `lm_head.*`), so weights load
by name. The forward pass is a function of (inputs, cache): the caller owns the PromptCache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cache import PromptCache
from .config import ModelConfig
from .errors import MimoError
from .language import TextModel
from .mrope import VisionTokens, rope_index
from .vision import VisionModel


@dataclass(frozen=True)
class PreparedInputs:
    """A prompt ready for the decoder: embeddings with vision features in place, and positions."""

    embeds: mx.array  # (B, L, C)
    positions: mx.array  # (3, B, L)
    rope_deltas: np.ndarray  # (B,)


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = TextModel(config.text)
        self.visual = VisionModel(config.vision)
        if not config.text.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self._vision_tokens = VisionTokens(
            image_token_id=config.image_token_id,
            video_token_id=config.video_token_id,
            spatial_merge_size=config.vision.spatial_merge_size,
            tokens_per_second=config.vision.tokens_per_second,
        )

    def make_cache(self) -> PromptCache:
        return PromptCache(len(self.model.layers))

    def __call__(
        self,
        input_ids: mx.array | np.ndarray,
        pixel_values: mx.array | np.ndarray | None = None,
        image_grid_thw: np.ndarray | None = None,
        pixel_values_videos: mx.array | np.ndarray | None = None,
        video_grid_thw: np.ndarray | None = None,
        second_per_grid_ts: Sequence[float] | None = None,
        cache: PromptCache | None = None,
    ) -> mx.array:
        """Logits (B, L, vocab) for `input_ids` (B, L), continuing from `cache` when it holds tokens.

        Vision features replace the `<|image_pad|>` / `<|video_pad|>` tokens, images first in order.
        A text-only continuation (a decode step) touches no host data, so steps can be pipelined.
        """
        has_vision = pixel_values is not None or pixel_values_videos is not None
        if cache is not None and cache.offset > 0 and not has_vision:
            embeds = self.model.embed_tokens(mx.array(input_ids))
            positions = self.continuation_positions(cache, embeds.shape[0])
            return self.logits(self.model(embeds, positions, cache.layers))
        prepared = self.prepare_inputs(
            input_ids,
            pixel_values,
            image_grid_thw,
            pixel_values_videos,
            video_grid_thw,
            second_per_grid_ts,
            cache,
        )
        if cache is None:
            return self.logits(self.model(prepared.embeds, prepared.positions))
        cache.rope_deltas = prepared.rope_deltas
        return self.logits(self.model(prepared.embeds, prepared.positions, cache.layers))

    def prepare_inputs(
        self,
        input_ids: mx.array | np.ndarray,
        pixel_values: mx.array | np.ndarray | None = None,
        image_grid_thw: np.ndarray | None = None,
        pixel_values_videos: mx.array | np.ndarray | None = None,
        video_grid_thw: np.ndarray | None = None,
        second_per_grid_ts: Sequence[float] | None = None,
        cache: PromptCache | None = None,
    ) -> PreparedInputs:
        """Run the vision tower once, place its features, and compute M-RoPE positions.

        Generation uses this directly to prefill a long prompt in chunks without re-encoding images.
        """
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise MimoError(f"input_ids must have shape (batch, length), got {ids.shape}")
        _check_pixels(pixel_values, image_grid_thw, "pixel_values", "image_grid_thw")
        _check_pixels(pixel_values_videos, video_grid_thw, "pixel_values_videos", "video_grid_thw")
        offset = cache.offset if cache is not None else 0
        deltas = cache.rope_deltas if cache is not None and offset > 0 else None
        positions, rope_deltas = rope_index(
            ids,
            self._vision_tokens,
            image_grid_thw,
            video_grid_thw,
            second_per_grid_ts,
            offset=offset,
            deltas=deltas,
        )
        embeds = self.model.embed_tokens(mx.array(ids))
        features = self.vision_features(
            pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
        )
        for token_id, feats in features:
            embeds = self._place(embeds, ids, token_id, feats)
        return PreparedInputs(embeds, mx.array(positions), rope_deltas)

    def vision_features(
        self,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
    ) -> list[tuple[int, mx.array]]:
        """(placeholder id, features) per modality; images and video go through the tower in one call."""
        parts = [
            (self.config.image_token_id, pixel_values, image_grid_thw),
            (self.config.video_token_id, pixel_values_videos, video_grid_thw),
        ]
        parts = [
            (tok, mx.array(px), np.asarray(g).reshape(-1, 3))
            for tok, px, g in parts
            if px is not None
        ]
        if not parts:
            return []
        pixels = mx.concatenate([px for _, px, _ in parts]) if len(parts) > 1 else parts[0][1]
        grids = np.concatenate([g for _, _, g in parts])
        merged = self.visual(pixels, grids)
        sizes = [
            int(np.sum(np.prod(g, axis=1))) // self.config.vision.merge_unit for _, _, g in parts
        ]
        return [
            (tok, merged[s : s + n])
            for (tok, _, _), s, n in zip(parts, np.cumsum([0, *sizes]), sizes, strict=False)
        ]

    def _place(self, embeds: mx.array, ids: np.ndarray, token_id: int, feats: mx.array) -> mx.array:
        # rope_index has already matched the placeholder runs against the grids the features come from.
        rows = np.flatnonzero(ids.reshape(-1) == token_id)
        batch, length, width = embeds.shape
        flat = embeds.reshape(batch * length, width)
        flat[mx.array(rows)] = feats.astype(flat.dtype)
        return flat.reshape(batch, length, width)

    def continuation_positions(self, cache: PromptCache, batch: int) -> mx.array:
        """(B,) first positions of text appended at the cache's offset (the same on all axes)."""
        deltas = cache.rope_deltas if cache.rope_deltas is not None else np.zeros(batch, np.int64)
        return mx.array((cache.offset + deltas).astype(np.int32))

    def logits(self, hidden: mx.array) -> mx.array:
        if self.config.text.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)


def _check_pixels(pixels, grid, pixel_name: str, grid_name: str) -> None:
    if (pixels is None) != (grid is None):
        raise MimoError(f"{pixel_name} and {grid_name} must be given together")
    if pixels is None:
        return
    grid = np.asarray(grid).reshape(-1, 3)
    expected = int(np.sum(np.prod(grid, axis=1)))
    if np.shape(pixels)[0] != expected:
        raise MimoError(
            f"{pixel_name} has {np.shape(pixels)[0]} patches but {grid_name} {grid.tolist()} "
            f"describes {expected}"
        )
