"""Window bookkeeping and batched segment attention of the vision tower."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from tiny_models import VISION
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from mimo_mlx.model.backend import vision_schedule
from mimo_mlx.model.config import VisionConfig
from mimo_mlx.model.vision import VisionModel, assemble, encode, group_attention, segment_attention
from mimo_mlx.model.windows import (
    frame_groups,
    frame_lengths,
    plan_attention,
    rotary_positions,
    window_order,
)

GRIDS = [
    [[1, 10, 18]],  # edges cut windows on both sides
    [[1, 16, 16]],  # sides already a multiple of the window: an extra empty window is dropped
    [[4, 6, 8], [1, 4, 4], [1, 34, 2]],  # video frames, a tiny image, a thin image
]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("window_size", [112, 56, 168])
def test_window_order_matches_transformers(grid, window_size):
    grid = np.array(grid)
    order, lengths = window_order(grid, merge=2, window_side=window_size // 28)
    ref_index, ref_cu = get_vision_window_index(torch.tensor(grid), 2, window_size, 14)
    np.testing.assert_array_equal(order, ref_index.numpy())
    np.testing.assert_array_equal(np.concatenate([[0], np.cumsum(lengths * 4)]), ref_cu.numpy())


@pytest.mark.parametrize("grid", GRIDS)
def test_rotary_positions_match_transformers(grid):
    grid = np.array(grid)
    ref = get_vision_position_ids(torch.tensor(grid), 2).numpy()
    np.testing.assert_array_equal(rotary_positions(grid, 2), ref)


@pytest.mark.parametrize("grid", GRIDS)
def test_window_partition_then_inverse_is_identity(grid):
    grid = np.array(grid)
    order, lengths = window_order(grid, merge=2, window_side=4)
    tokens = np.arange(len(order)) * 10 + 3
    windowed = tokens[order]
    np.testing.assert_array_equal(windowed[np.argsort(order)], tokens)
    assert sorted(order.tolist()) == list(range(len(order)))
    assert lengths.sum() == len(order) and lengths.min() > 0 and lengths.max() <= 16


def naive_segment_attention(q, k, v, lengths, scale):
    """One softmax(q k^T) v per segment, in numpy float64."""
    out, start = [], 0
    for n in lengths:
        qs, ks, vs = (x[start : start + n].transpose(1, 0, 2) for x in (q, k, v))  # (H, n, D)
        scores = qs @ ks.transpose(0, 2, 1) * scale
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out.append((probs @ vs).transpose(1, 0, 2).reshape(n, -1))
        start += n
    return np.concatenate(out)


@pytest.mark.parametrize("pad_to_longest", [True, False])
@pytest.mark.parametrize("lengths", [[64, 64, 64], [64, 32, 64, 16, 8], [12, 40, 12, 4]])
def test_batched_segment_attention_equals_per_segment_loop(lengths, pad_to_longest):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((sum(lengths), 3, 8)) for _ in range(3))
    plan = plan_attention(np.array(lengths), pad_to_longest=pad_to_longest)
    assert len(plan.groups) == (1 if pad_to_longest else len(set(lengths)))
    ours = segment_attention(*(heads_first(x) for x in (q, k, v)), plan, 0.35)
    expected = naive_segment_attention(q, k, v, lengths, 0.35)
    assert np.abs(np.array(ours) - expected).max() < 1e-5


def heads_first(x: np.ndarray) -> mx.array:
    return mx.array(x.transpose(1, 0, 2), dtype=mx.float32)  # (N, H, D) -> (H, N, D)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("max_patches", [1, 64, 100, 10_000])
def test_frame_groups_cover_the_frames_in_order(grid, max_patches):
    """Groups of whole frames, in order, each within the limit unless it is one larger frame."""
    grid = np.array(grid)
    groups = frame_groups(grid, max_patches)
    frames = [frame_lengths(g) for g in groups]
    np.testing.assert_array_equal(np.concatenate(frames), frame_lengths(grid))
    for lengths in frames:
        assert lengths.sum() <= max_patches or len(lengths) == 1
    for before, after in zip(frames, frames[1:], strict=False):
        assert before.sum() + after[0] > max_patches  # a group closes only when the next is full
    example = frame_groups(np.array([[4, 8, 8], [1, 16, 16]]), 200)
    assert [g.tolist() for g in example] == [[[3, 8, 8]], [[1, 8, 8]], [[1, 16, 16]]]


def test_full_attention_chunks_long_frames():
    """Splitting queries to bound score memory changes nothing numerically."""
    rng = np.random.default_rng(1)
    lengths = [300, 200]
    q, k, v = (heads_first(rng.standard_normal((500, 2, 8))) for _ in range(3))
    plan = plan_attention(np.array(lengths), pad_to_longest=False)
    pieces = [list(group_attention(q, k, v, g, 0.35, 37)) for g in plan.groups]
    assert [len(p) for p in pieces] == [6, 9]  # 200 and 300 queries in pieces of 37
    ours = assemble(pieces, plan)
    expected = naive_segment_attention(
        *(np.array(x).transpose(1, 0, 2) for x in (q, k, v)), lengths, 0.35
    )
    assert np.abs(np.array(ours) - expected).max() < 1e-5


def test_1344_image_never_holds_a_full_attention_matrix():
    """One 1344x1344 image is a single 9216-patch frame; on the CPU, whose attention holds the
    scores, the pass runs in evaluated pieces (the CPU's schedule) and holds about ten hidden
    states above its input: the hidden state; queries, keys and values; the attended output and
    its reordered copies; one piece's budget of two. Never one head's score matrix."""
    config = VisionConfig(**{**VISION, "depth": 2, "fullatt_block_indexes": (1,)})
    tower = VisionModel(config)
    mx.eval(tower.parameters())
    grid = np.array([[1, 96, 96]])
    px = mx.random.normal((9216, 1176))
    mx.eval(px)
    schedule = vision_schedule(
        "cpu", mx.float32, config.head_dim, 9216, 9216, config.hidden_size, config.intermediate_size
    )
    assert not schedule.one_graph
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    out = encode(tower, px, grid, schedule)
    mx.eval(out)
    peak = mx.get_peak_memory() - before
    one_head_scores = 9216 * 9216 * 4  # a single head's float32 score matrix for the frame
    hidden_state = 9216 * config.hidden_size * 4
    assert out.shape == (2304, config.out_hidden_size)
    assert peak < one_head_scores, f"peak {peak / 2**20:.0f} MiB"
    assert peak <= 10 * hidden_state, f"peak {peak / hidden_state:.1f} hidden states"
