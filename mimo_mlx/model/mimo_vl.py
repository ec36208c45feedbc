"""MiMo-VL (Qwen2.5-VL architecture): vision tower and merger in front of the MiMo-7B decoder.

Attribute names follow the published checkpoint (`model.*`, `visual.*`, `lm_head.*`), so weights load
by name. One forward path: `model(input_ids, cache=..., positions=..., vision_features=...)` runs a
prefill chunk with vision features in place, or a decode step; the caller owns the PromptCache.
`prepare_prompt` does a prompt's host work once (vision tower, M-RoPE positions) so a long prompt can
be fed through that call in chunks.

    prompt = model.prepare_prompt(input_ids, pixel_values=..., image_grid_thw=...)
    cache = model.make_cache()
    logits = model(**prompt.chunk(), cache=cache)          # or chunk(0, 512), chunk(512, ...)
    logits = model(mx.array([[next_token]]), cache=cache)  # decode
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import MimoError
from ..options import CacheOptions
from .backend import device_kind
from .batch_cache import BatchCache
from .cache import PromptCache, check_cache_options
from .config import ModelConfig
from .language import TextModel, rows_through
from .mrope import VisionTokens, rope_index
from .vision import VisionModel, encode, tower_schedule


@dataclass(frozen=True)
class Prompt:
    """A prompt ready for the decoder: token ids, M-RoPE positions and vision features.

    positions is None for a text-only prompt (text positions continue the cache by themselves).
    vision_features holds one row per image/video placeholder token, in the order they appear.
    """

    input_ids: np.ndarray  # (B, L)
    positions: np.ndarray | None  # (3, B, L)
    vision_features: mx.array | None  # (placeholders, hidden)
    placeholders_before: np.ndarray  # (L + 1,) placeholder tokens before each index (all rows)

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def chunk(self, start: int = 0, end: int | None = None) -> dict[str, Any]:
        """Keyword arguments of `Model.__call__` for tokens [start, end) of every row."""
        end = self.length if end is None else min(end, self.length)
        features = None
        if self.vision_features is not None:
            first, last = self.placeholders_before[start], self.placeholders_before[end]
            features = self.vision_features[int(first) : int(last)] if last > first else None
        return {
            "input_ids": self.input_ids[:, start:end],
            "positions": None if self.positions is None else self.positions[:, :, start:end],
            "vision_features": features,
        }


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
        self._placeholder_ids = np.array([config.image_token_id, config.video_token_id])

    def make_cache(
        self, kv_bits: int | None = None, kv_group_size: int = 64, quantized_kv_start: int = 0
    ) -> PromptCache:
        """An empty cache for one sequence; with `kv_bits` (4 or 8) its keys and values are
        stored quantized once it holds `quantized_kv_start` tokens (see `options.CacheOptions`)."""
        options = CacheOptions(kv_bits, kv_group_size, quantized_kv_start)
        check_cache_options(options, self.config.text.head_dim)
        return PromptCache(len(self.model.layers), options)

    def __call__(
        self,
        input_ids: mx.array | np.ndarray,
        cache: PromptCache | BatchCache | None = None,
        *,
        positions: np.ndarray | None = None,
        vision_features: mx.array | None = None,
        logits_to_keep: int = 0,
        layers_per_eval: int = 0,
    ) -> mx.array:
        """Logits (B, L, vocab) of tokens (B, L) appended to `cache` (None: a fresh sequence; a
        `BatchCache`: one text token for each of several sequences decoded together).

        positions: (3, B, L) M-RoPE positions from `prepare_prompt`; None means text continuing
        the cache, which needs no host data (decode steps can be pipelined).
        vision_features: rows for the image/video placeholder tokens among `input_ids`, in order.
        logits_to_keep: as in transformers, logits for the last this many tokens only (0: all).
        layers_per_eval: the caller's memory plan (`backend.prefill_schedule`): the hidden states
        are evaluated after every this many decoder layers; 0: the pass is one lazy graph.
        The cache's rotary offsets are updated here and nowhere else, and here it switches to
        quantized storage when its options say it is time.
        """
        text = self._text_input(input_ids, cache, positions, vision_features, logits_to_keep)
        return self.logits(self.model.segments([text], layers_per_eval)[0])

    def decode_with_chunk(
        self,
        ids: mx.array,
        cache: BatchCache,
        chunk: dict[str, Any],
        chunk_cache: PromptCache,
        layers_per_eval: int = 0,
    ) -> tuple[mx.array, mx.array]:
        """A batch's decode step and another sequence's prompt chunk in one pass: logits
        (B, 1, vocab) of `ids` (B, 1) continuing the `BatchCache`, and (1, 1, vocab) of the last
        token of `chunk` (`Prompt.chunk`'s arguments) continuing `chunk_cache`, each as its own
        call would compute them (bit for bit where the backend computes each row of a matmul as
        it would alone: see `generation.batch`). Every matmul takes both inputs' rows at once, so
        the chunk costs little more than the weights' one read the step makes anyway; the
        attention runs apart, each input over its own cache."""
        inputs = [
            self._text_input(ids, cache, None, None, 0),
            self._text_input(
                chunk["input_ids"], chunk_cache, chunk["positions"], chunk["vision_features"], 1
            ),
        ]
        batch, prompt = rows_through(self.logits, self.model.segments(inputs, layers_per_eval))
        return batch, prompt

    def _text_input(self, input_ids, cache, positions, vision_features, keep: int) -> tuple:
        """What the decoder takes for tokens `input_ids` continuing `cache` (`__call__`'s
        arguments): (embeddings, rotary positions, layer caches, keep, attention mask). The
        cache's positions are recorded and its storage switched here."""
        ids = input_ids if isinstance(input_ids, mx.array) else mx.array(input_ids)
        embeds = self.model.embed_tokens(ids)
        if vision_features is not None:
            embeds = self._place(embeds, np.asarray(input_ids), vision_features)
        batch = embeds.shape[0]
        if cache is not None:
            cache.quantize_if_due()
        if positions is not None:
            if cache is not None:
                cache.record_positions(positions)
            rope = mx.array(positions)
        else:
            starts = cache.next_positions(batch) if cache is not None else np.zeros(batch, np.int64)
            # Rows continuing at one position take a plain offset (the faster rope kernel).
            same = bool(np.all(starts == starts[0]))
            rope = int(starts[0]) if same else mx.array(starts.astype(np.int32))
        layers = None if cache is None else cache.layers
        mask = None if cache is None else cache.attention_mask(ids.shape[1])
        return embeds, rope, layers, keep, mask

    def prepare_prompt(
        self,
        input_ids: np.ndarray,
        pixel_values: mx.array | np.ndarray | None = None,
        image_grid_thw: np.ndarray | None = None,
        pixel_values_videos: mx.array | np.ndarray | None = None,
        video_grid_thw: np.ndarray | None = None,
        second_per_grid_ts: Sequence[float] | None = None,
        cache: PromptCache | None = None,
        vision_features: mx.array | None = None,
    ) -> Prompt:
        """Run the vision tower once and compute the prompt's positions (continuing `cache`).

        Images and videos are given as transformers' processor returns them; `vision_features`
        (already merged features, one row per placeholder in prompt order) replaces the pixels,
        e.g. from a cache of encoded images (the grids are still needed, for the positions).
        """
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise MimoError(f"input_ids must have shape (batch, length), got {ids.shape}")
        if vision_features is None:
            _check_pixels(pixel_values, image_grid_thw, "pixel_values", "image_grid_thw")
            _check_pixels(
                pixel_values_videos, video_grid_thw, "pixel_values_videos", "video_grid_thw"
            )
        placeholder = np.isin(ids, self._placeholder_ids)
        before = np.concatenate([[0], np.cumsum(placeholder.sum(axis=0))])
        if not placeholder.any() and image_grid_thw is None and video_grid_thw is None:
            return Prompt(ids, None, None, before)
        offset = cache.offset if cache is not None else 0
        deltas = cache.rope_deltas if cache is not None else None
        positions, _ = rope_index(
            ids,
            self._vision_tokens,
            image_grid_thw,
            video_grid_thw,
            second_per_grid_ts,
            offset=offset,
            deltas=deltas,
        )
        if vision_features is None:
            vision_features = self.encode_vision(
                pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
            )
            vision_features = vision_features[mx.array(self.placeholder_order(ids))]
        elif vision_features.shape[0] != before[-1]:
            raise MimoError(
                f"{vision_features.shape[0]} vision feature rows for {before[-1]} placeholders"
            )
        return Prompt(ids, positions, vision_features, before)

    def encode_vision(
        self,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
    ) -> mx.array:
        """Merged features of every image, then every video, from one pass of the tower.

        The pass follows the backend's memory schedule (`vision.tower_schedule`): evaluated every
        few blocks where attention is fused, in evaluated pieces where it would hold every score.
        """
        parts = [
            (px, g)
            for px, g in ((pixel_values, image_grid_thw), (pixel_values_videos, video_grid_thw))
            if px is not None
        ]
        if not parts:
            raise MimoError("the prompt has image/video placeholders but no pixels were given")
        arrays = [mx.array(px) for px, _ in parts]
        pixels = arrays[0] if len(arrays) == 1 else mx.concatenate(arrays)  # one part: no copy
        grids = np.concatenate([np.asarray(g).reshape(-1, 3) for _, g in parts])
        return encode(self.visual, pixels, grids, tower_schedule(self.visual, grids, device_kind()))

    def encode_pieces(
        self, pixel_values: mx.array | np.ndarray, grid_thw: np.ndarray, max_tokens: int
    ) -> Iterator[mx.array]:
        """`encode_vision`'s rows for images or videos with grids `grid_thw` (n, 3), from several
        passes of the tower: each item alone, and a video a run of whole temporal patches at a
        time, at most `max_tokens` merged tokens (or one temporal patch). Attention never
        crosses frames, so a run of frames encodes as it does within the whole video. Yields
        each piece, lazily; in order, they are the rows of one pass over everything."""
        grids = np.asarray(grid_thw).reshape(-1, 3)
        unit = self.config.vision.merge_unit
        start = 0
        for t, h, w in grids.tolist():
            frame = h * w  # patches per temporal patch
            per_piece = max(1, max_tokens * unit // frame)
            for first in range(0, t, per_piece):
                last = min(t, first + per_piece)
                rows = pixel_values[start + first * frame : start + last * frame]
                yield self.encode_vision(rows, np.array([[last - first, h, w]]))
            start += t * frame

    def placeholder_order(self, ids: np.ndarray) -> np.ndarray:
        """Rows of (image features + video features) for each placeholder, in prompt order."""
        flat = ids.reshape(-1)
        image = flat == self.config.image_token_id
        video = flat == self.config.video_token_id
        rank = np.where(image, np.cumsum(image) - 1, np.cumsum(video) - 1 + image.sum())
        return rank[image | video]

    def _place(self, embeds: mx.array, ids: np.ndarray, features: mx.array) -> mx.array:
        rows = np.flatnonzero(np.isin(ids.reshape(-1), self._placeholder_ids))
        if len(rows) != features.shape[0]:
            raise MimoError(
                f"{features.shape[0]} vision feature rows for {len(rows)} placeholder tokens"
            )
        batch, length, width = embeds.shape
        flat = embeds.reshape(batch * length, width)
        flat[mx.array(rows)] = features.astype(flat.dtype)
        return flat.reshape(batch, length, width)

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
