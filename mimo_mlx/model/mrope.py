"""Multimodal rotary positions (M-RoPE) for the decoder: pure numpy, once per prompt on the host.

Every token gets a (temporal, height, width) position. Text tokens use the same value on all three axes,
counting up. An image or video segment starts at st = (max position so far) + 1 and spans its merged grid:

    t = st + floor(frame * second_per_grid_t * tokens_per_second)   (images: st)
    h = st + row,  w = st + col

Text after a segment continues at (max position so far) + 1.

Worked example (merge 2, one image with grid (1, 4, 6) -> a 2x3 merged grid of 6 tokens):

    tokens    a  b  <v> P  P  P  P  P  P  </v> c
    temporal  0  1  2   3  3  3  3  3  3  6    7
    height    0  1  2   3  3  3  4  4  4  6    7
    width     0  1  2   3  4  5  3  4  5  6    7

The rope delta is (max position + 1) - (tokens so far); a later token at cache offset p sits at p + delta.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import MimoError


@dataclass(frozen=True)
class VisionTokens:
    """What the position rule needs to know about vision placeholders."""

    image_token_id: int
    video_token_id: int
    spatial_merge_size: int
    tokens_per_second: float


def rope_index(
    input_ids: np.ndarray,
    tokens: VisionTokens,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    second_per_grid_ts: Sequence[float] | None = None,
    offset: int = 0,
    deltas: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Positions (3, B, L) and rope deltas (B,) for a batch of token ids (B, L).

    Images and videos are consumed in order across the batch, row by row. When the ids continue a
    cached sequence, `offset` is the number of cached tokens and `deltas` (B,) their rope deltas.
    """
    input_ids = np.asarray(input_ids).reshape(np.shape(input_ids)[0], -1)
    batch, length = input_ids.shape
    grids = {
        tokens.image_token_id: _grid_list(image_grid_thw),
        tokens.video_token_id: _grid_list(video_grid_thw),
    }
    seconds = list(second_per_grid_ts) if second_per_grid_ts is not None else []
    used = {tokens.image_token_id: 0, tokens.video_token_id: 0}
    previous = np.zeros(batch, dtype=np.int64) if deltas is None else np.asarray(deltas, np.int64)
    positions = np.empty((3, batch, length), dtype=np.int64)
    deltas = np.empty(batch, dtype=np.int64)
    for b in range(batch):
        ids, next_pos, i = input_ids[b], offset + int(previous[b]), 0
        while i < length:
            token = int(ids[i])
            if token not in grids:
                positions[:, b, i] = next_pos
                next_pos, i = next_pos + 1, i + 1
                continue
            k = used[token]
            if k >= len(grids[token]):
                raise _count_error(input_ids, tokens, grids)
            used[token] += 1
            grid = grids[token][k]
            if token == tokens.video_token_id:
                interval = tokens.tokens_per_second * (seconds[k] if k < len(seconds) else 1.0)
            else:
                interval = 1.0
            segment = _segment_positions(grid, tokens.spatial_merge_size, interval) + next_pos
            n = segment.shape[1]
            if i + n > length or np.any(ids[i : i + n] != token):
                raise _count_error(input_ids, tokens, grids)
            positions[:, b, i : i + n] = segment
            next_pos, i = int(segment.max()) + 1, i + n
        deltas[b] = next_pos - (offset + length)
    if any(used[t] != len(grids[t]) for t in grids):
        raise _count_error(input_ids, tokens, grids)
    return positions, deltas


def _segment_positions(grid: tuple[int, int, int], merge: int, interval: float) -> np.ndarray:
    """(3, t*h*w/merge^2) offsets of one image/video segment from its start position."""
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    temporal = np.floor(np.arange(t) * interval).astype(np.int64)
    tt, hh, ww = np.meshgrid(temporal, np.arange(h), np.arange(w), indexing="ij")
    return np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)])


def _grid_list(grid_thw: np.ndarray | None) -> list[tuple[int, int, int]]:
    if grid_thw is None:
        return []
    return [tuple(int(x) for x in row) for row in np.asarray(grid_thw).reshape(-1, 3)]


def _count_error(input_ids: np.ndarray, tokens: VisionTokens, grids: dict) -> MimoError:
    merge2 = tokens.spatial_merge_size**2
    parts = []
    for token, name in ((tokens.image_token_id, "image"), (tokens.video_token_id, "video")):
        found = int(np.sum(input_ids == token))
        expected = sum(t * h * w // merge2 for t, h, w in grids[token])
        if found or expected:
            parts.append(f"{found} {name} placeholder tokens but the {name} grids give {expected}")
    return MimoError(
        "vision placeholders do not match the inputs: "
        + "; ".join(parts)
        + " (each image/video needs one run of grid_t*grid_h*grid_w/4 pad tokens, in order)"
    )
