"""Hand-computed M-RoPE positions (golden values worked out on paper, not printed by the code)."""

from __future__ import annotations

import numpy as np
import pytest

from mimo_mlx.errors import MimoError
from mimo_mlx.model.mrope import VisionTokens, rope_index

IMG, VID, VS, VE = 90, 91, 92, 93
TOKENS = VisionTokens(
    image_token_id=IMG, video_token_id=VID, spatial_merge_size=2, tokens_per_second=2
)


def test_text_image_text():
    # a b <vs> [image 2x3 merged] <ve> c ; the image starts at 3
    ids = np.array([[1, 2, VS, *[IMG] * 6, VE, 3]])
    positions, deltas = rope_index(ids, TOKENS, image_grid_thw=np.array([[1, 4, 6]]))
    expected = np.array(
        [
            [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7],  # temporal
            [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7],  # height
            [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7],  # width
        ]
    )
    np.testing.assert_array_equal(positions[:, 0], expected)
    assert deltas.tolist() == [8 - 11]


def test_two_images():
    # <vs> [1x2] <ve> x <vs> [2x1] <ve>
    ids = np.array([[VS, IMG, IMG, VE, 5, VS, IMG, IMG, VE]])
    grids = np.array([[1, 2, 4], [1, 4, 2]])
    positions, deltas = rope_index(ids, TOKENS, image_grid_thw=grids)
    expected = np.array(
        [
            [0, 1, 1, 3, 4, 5, 6, 6, 8],
            [0, 1, 1, 3, 4, 5, 6, 7, 8],
            [0, 1, 2, 3, 4, 5, 6, 6, 8],
        ]
    )
    np.testing.assert_array_equal(positions[:, 0], expected)
    assert deltas.tolist() == [9 - 9]


def test_video_longer_than_its_grid():
    # 3 temporal patches of a 1x2 merged grid, 1 s per patch at 2 tokens/s: t = 0, 2, 4 after start.
    # Text after it continues at max position + 1 = 1 + 4 + 1 = 6, not start + max(h, w) = 3.
    ids = np.array([[VS, *[VID] * 6, VE, 7]])
    positions, deltas = rope_index(
        ids, TOKENS, video_grid_thw=np.array([[3, 2, 4]]), second_per_grid_ts=[1.0]
    )
    expected = np.array(
        [
            [0, 1, 1, 3, 3, 5, 5, 6, 7],
            [0, 1, 1, 1, 1, 1, 1, 6, 7],
            [0, 1, 2, 1, 2, 1, 2, 6, 7],
        ]
    )
    np.testing.assert_array_equal(positions[:, 0], expected)
    assert deltas.tolist() == [8 - 9]


def test_fractional_seconds_floor():
    # 0.7 s per patch at 2 tokens/s: floor(0, 1.4, 2.8) = 0, 1, 2.
    ids = np.array([[*[VID] * 3]])
    positions, _ = rope_index(
        ids, TOKENS, video_grid_thw=np.array([[3, 2, 2]]), second_per_grid_ts=[0.7]
    )
    assert positions[0, 0].tolist() == [0, 1, 2]


def test_continuation_starts_after_the_cached_prompt():
    # Cached: 11 tokens with delta -3 (the text/image/text prompt above); next token sits at 8.
    positions, deltas = rope_index(np.array([[4, 5]]), TOKENS, offset=11, deltas=np.array([-3]))
    np.testing.assert_array_equal(positions[:, 0], [[8, 9]] * 3)
    assert deltas.tolist() == [-3]


def test_batch_rows_consume_images_in_order():
    ids = np.array([[VS, IMG, VE, 1], [2, VS, IMG, VE]])
    grids = np.array([[1, 2, 2], [1, 2, 2]])
    positions, deltas = rope_index(ids, TOKENS, image_grid_thw=grids)
    np.testing.assert_array_equal(positions[0, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(positions[0, 1], [0, 1, 2, 3])
    assert deltas.tolist() == [0, 0]


@pytest.mark.parametrize(
    "ids, grids",
    [
        ([[VS, IMG, IMG, IMG, VE]], [[1, 2, 4]]),  # 3 pads, the grid gives 2
        ([[VS, IMG, VE]], [[1, 2, 4]]),  # 1 pad, the grid gives 2
        ([[VS, IMG, IMG, VE]], None),  # pads without any image
        ([[1, 2, 3]], [[1, 2, 2]]),  # an image without pads
    ],
)
def test_placeholder_count_mismatch_is_a_clear_error(ids, grids):
    with pytest.raises(MimoError, match="placeholder"):
        rope_index(np.array(ids), TOKENS, image_grid_thw=None if grids is None else np.array(grids))
