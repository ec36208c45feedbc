"""Encoded images and videos, kept so the vision tower never runs twice on the same pixels.

Keys are `PreparedMedia.key` (a hash of the preprocessed pixels, which fold in every preprocessing
setting) together with the model they were encoded by. Entries are evicted least recently used
first once their bytes pass the budget; an evicted item is simply encoded again, identically, so
evictions never change an answer.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import mlx.core as mx
import numpy as np

from ..inputs.processor import PreparedMedia
from ..model.mimo_vl import Model

DEFAULT_VISION_CACHE_BYTES = 512 * 2**20  # ~32 photos at the default size in bfloat16


class VisionCache:
    """Merged vision features by (model, media key), bounded by bytes, least recently used out."""

    def __init__(self, max_bytes: int = DEFAULT_VISION_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, str], mx.array] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def features(self, model: Model, media: Sequence[PreparedMedia]) -> list[mx.array]:
        """The features of each item, in order: cached ones reused, the rest encoded together in
        one pass of the tower and cached."""
        owner = _model_id(model, self)
        found = {item.key: self._get((owner, item.key)) for item in media}
        missing = {item.key: item for item in media if found[item.key] is None}
        self.hits += len(media) - len(missing)
        self.misses += len(missing)
        if missing:
            for key, features in zip(missing, _encode(model, list(missing.values())), strict=True):
                mx.eval(features)  # cached features must not hold the graph that made them
                found[key] = features
                self._put((owner, key), features)
        return [found[item.key] for item in media]

    def features_in_steps(
        self, model: Model, media: Sequence[PreparedMedia], max_tokens: int
    ) -> Iterator[list[mx.array] | None]:
        """`features`, a piece of the tower at a time (`Model.encode_pieces`: an image, or a run
        of a video's frames of at most `max_tokens` merged tokens): yields None after each
        evaluated piece, then the features of each item. The same rows as `features` gives."""
        owner = _model_id(model, self)
        found = {item.key: self._get((owner, item.key)) for item in media}
        missing = {item.key: item for item in media if found[item.key] is None}
        self.hits += len(media) - len(missing)
        self.misses += len(missing)
        for key, item in missing.items():
            grid = np.array([item.grid_thw], dtype=np.int64)
            pieces = []
            for piece in model.encode_pieces(item.pixel_values, grid, max_tokens):
                mx.eval(piece)
                pieces.append(piece)
                yield None
            found[key] = pieces[0] if len(pieces) == 1 else mx.concatenate(pieces)
            mx.eval(found[key])
            self._put((owner, key), found[key])
        yield [found[item.key] for item in media]

    def drop_model(self, owner: int) -> None:
        with self._lock:
            for key in [k for k in self._entries if k[0] == owner]:
                self._bytes -= self._entries.pop(key).nbytes

    def _get(self, key: tuple[int, str]) -> mx.array | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def _put(self, key: tuple[int, str], value: mx.array) -> None:
        with self._lock:
            if key in self._entries or value.nbytes > self.max_bytes:
                return
            self._entries[key] = value
            self._bytes += value.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes


def _encode(model: Model, media: list[PreparedMedia]) -> list[mx.array]:
    """Features of each item: images and videos go through the tower in one call."""
    images = [m for m in media if m.kind == "image"]
    videos = [m for m in media if m.kind == "video"]

    def stacked(items):
        if not items:
            return None, None
        grids = np.array([m.grid_thw for m in items], dtype=np.int64)
        return np.concatenate([m.pixel_values for m in items]), grids

    (image_px, image_grid), (video_px, video_grid) = stacked(images), stacked(videos)
    merged = model.encode_vision(image_px, image_grid, video_px, video_grid)  # images, then videos
    unit = model.config.vision.merge_unit
    rows = np.cumsum([0] + [int(np.prod(m.grid_thw)) // unit for m in images + videos])
    by_item = {id(m): merged[a:b] for m, a, b in zip(images + videos, rows, rows[1:], strict=False)}
    return [by_item[id(m)] for m in media]


# Caches only hold models' ids; an id is dropped from every cache when its model is collected,
# so a later model that happens to get the same id never sees another model's features.
_tracked: set[int] = set()
_caches: weakref.WeakSet = weakref.WeakSet()


def _model_id(model: Model, cache: VisionCache) -> int:
    _caches.add(cache)
    owner = id(model)
    if owner not in _tracked:
        _tracked.add(owner)
        weakref.finalize(model, _forget, owner)
    return owner


def _forget(owner: int) -> None:
    _tracked.discard(owner)
    for cache in list(_caches):
        cache.drop_model(owner)


_shared: VisionCache | None = None


def shared_vision_cache() -> VisionCache:
    """The process-wide cache that conversations use unless given their own."""
    global _shared
    if _shared is None:
        _shared = VisionCache()
    return _shared
