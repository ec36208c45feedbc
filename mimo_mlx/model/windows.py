"""Index bookkeeping for the vision tower: pure numpy, computed once per request on the host.

Patches arrive frame by frame, each frame in merge-block order (the 2x2 patches that become one decoder
token are adjacent). The tower reorders merged tokens window by window so that every attention window,
and every frame, is a contiguous run of rows; attention then runs over those runs in a few batched calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def rotary_positions(grid_thw: np.ndarray, merge: int) -> np.ndarray:
    """(row, col) of every patch in arrival order, shape (num_patches, 2)."""
    positions = []
    for t, h, w in np.asarray(grid_thw, dtype=np.int64):
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # (h, w)
        block = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1)  # merge-block order
        cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        positions.append(np.tile(np.stack([rows, cols], axis=-1), (t, 1)))
    return np.concatenate(positions)


def window_order(
    grid_thw: np.ndarray, merge: int, window_side: int
) -> tuple[np.ndarray, np.ndarray]:
    """Permutation of merged tokens that makes each window contiguous, and each window's length.

    Per frame the merged grid is padded to whole windows (a side that already is a multiple gets one
    extra, empty window, as in the reference); empty windows are dropped. Lengths count merged tokens.

    Example: one frame with a 2x6 merged grid and window_side 4 gives windows of 2x4 and 2x2 tokens:
    order [0 1 2 3 6 7 8 9 | 4 5 10 11], lengths [8, 4].
    """
    order, lengths, base = [], [], 0
    for t, h, w in np.asarray(grid_thw, dtype=np.int64):
        gh, gw = h // merge, w // merge
        nh, nw = gh // window_side + 1, gw // window_side + 1
        index = np.full((t, nh * window_side, nw * window_side), -1, dtype=np.int64)
        index[:, :gh, :gw] = np.arange(t * gh * gw).reshape(t, gh, gw) + base
        index = index.reshape(t, nh, window_side, nw, window_side).transpose(0, 1, 3, 2, 4)
        index = index.reshape(t * nh * nw, window_side * window_side)  # (windows, tokens)
        valid = index >= 0
        counts = valid.sum(axis=1)
        order.append(index[valid])
        lengths.append(counts[counts > 0])
        base += t * gh * gw
    return np.concatenate(order), np.concatenate(lengths)


def frame_lengths(grid_thw: np.ndarray) -> np.ndarray:
    """Patches per frame, one entry per frame of every image and video."""
    grid = np.asarray(grid_thw, dtype=np.int64)
    return np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])


def frame_groups(grid_thw: np.ndarray, max_patches: int) -> list[np.ndarray]:
    """Consecutive runs of whole frames, as grids (t, h, w), of at most `max_patches` patches each
    (a larger frame alone). Frames keep their order, so each group's patches are a run of the
    pass's rows, and its merged tokens a run of the pass's features.

    Example: grid [[4, 8, 8], [1, 16, 16]] (frames of 64, 64, 64, 64 and 256 patches) with 200
    gives [[3, 8, 8]], [[1, 8, 8]] and [[1, 16, 16]].
    """
    groups: list[list[list[int]]] = []
    patches = max_patches + 1  # the first frame opens a group
    for t, h, w in np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3):
        done = 0
        while done < t:
            if patches + h * w > max_patches:
                groups.append([])
                patches = 0
            take = min(t - done, max(1, (max_patches - patches) // (h * w)))
            groups[-1].append([take, h, w])
            patches += take * h * w
            done += take
    return [np.array(rows, dtype=np.int64) for rows in groups]


@dataclass(frozen=True)
class AttentionGroup:
    """Segments attended to in one batched call: rows `index` (count, size) of the token array.

    `index` is None when the group is rows [0, count*size) in order, so a reshape suffices.
    `key_mask` (count, size) marks real keys when segments were padded to `size`; None when none were.
    """

    index: np.ndarray | None
    key_mask: np.ndarray | None
    count: int
    size: int


@dataclass(frozen=True)
class AttentionPlan:
    """How to run attention restricted to segments, and how to put the outputs back in row order.

    The groups' outputs, flattened and concatenated, are rows of a buffer; `restore[i]` is the buffer
    row holding token i (None when the buffer already is in token order).
    """

    groups: tuple[AttentionGroup, ...]
    restore: np.ndarray | None


def plan_attention(lengths: np.ndarray, pad_to_longest: bool) -> AttentionPlan:
    """Batch contiguous segments of the given lengths into few attention calls.

    pad_to_longest=True: one call, short segments padded and their padding keys masked (windows, where
    lengths differ only at image edges). False: one call per distinct length, no padding (frames, whose
    lengths can differ by orders of magnitude between images).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    if np.all(lengths == lengths[0]):
        return AttentionPlan((AttentionGroup(None, None, len(lengths), int(lengths[0])),), None)
    if pad_to_longest:
        size = int(lengths.max())
        offsets = np.arange(size)
        key_mask = offsets[None, :] < lengths[:, None]  # (segments, size)
        index = np.where(
            key_mask, starts[:, None] + offsets, starts[:, None]
        )  # pads read a real row
        restore = np.flatnonzero(key_mask.reshape(-1))
        return AttentionPlan((AttentionGroup(index, key_mask, len(lengths), size),), restore)
    groups, rows = [], []
    for size in np.unique(lengths):
        picked = starts[lengths == size]
        index = picked[:, None] + np.arange(size)  # (segments, size)
        groups.append(AttentionGroup(index, None, len(picked), int(size)))
        rows.append(index.reshape(-1))
    restore = np.argsort(np.concatenate(rows))
    return AttentionPlan(tuple(groups), restore)
