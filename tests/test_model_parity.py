"""float32 logits of the MLX port against transformers' Qwen2_5_VLForConditionalGeneration."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import build_ids, hf_logits, mlx_logits, pixels, save_checkpoint, tiny_hf_model

from mimo_mlx import load_model
from mimo_mlx.inputs.video import preprocess_video, read_video
from mimo_mlx.model.backend import VisionSchedule
from mimo_mlx.model.vision import encode

TOLERANCE = 1e-4

# 131x257 and 30x40 images as the processor sizes them: (140, 252) and, below min_pixels, (56, 84).
AWKWARD = (1, 10, 18)
BELOW_MIN_PIXELS = (1, 4, 6)


@pytest.fixture(scope="module")
def reference():
    return tiny_hf_model(seed=0)


@pytest.fixture(scope="module")
def model(reference, tmp_path_factory):
    return load_model(save_checkpoint(reference, tmp_path_factory.mktemp("tiny")))


def assert_close(ours: mx.array, theirs: np.ndarray) -> None:
    ours = np.array(ours)
    assert ours.shape == theirs.shape
    diff = np.abs(ours - theirs).max()
    assert diff < TOLERANCE, f"max abs logit difference {diff:.2e}"


def test_text_only(model, reference):
    ids = build_ids([("text", 17)], np.random.default_rng(1))
    assert_close(model(ids), hf_logits(reference, ids))


def test_two_images_between_text(model, reference):
    rng = np.random.default_rng(2)
    grids = np.array([AWKWARD, BELOW_MIN_PIXELS])
    ids = build_ids(
        [("text", 5), ("image", AWKWARD), ("text", 3), ("image", BELOW_MIN_PIXELS), ("text", 4)],
        rng,
    )
    px = pixels(grids, rng)
    ours = mlx_logits(model, ids, pixel_values=px, image_grid_thw=grids)
    assert_close(ours, hf_logits(reference, ids, pixel_values=px, image_grid_thw=grids))


def test_four_frame_video(model, reference):
    rng = np.random.default_rng(3)
    grid = np.array([[2, 6, 8]])  # 4 frames -> 2 temporal patches; 3x4 merged tokens per patch
    ids = build_ids([("text", 4), ("video", tuple(grid[0])), ("text", 6)], rng)
    px = pixels(grid, rng)
    seconds = [1.0]
    ours = mlx_logits(
        model, ids, pixel_values_videos=px, video_grid_thw=grid, second_per_grid_ts=seconds
    )
    theirs = hf_logits(
        reference,
        ids,
        pixel_values_videos=px,
        video_grid_thw=grid,
        second_per_grid_ts=torch.tensor(seconds),
    )
    assert_close(ours, theirs)


def test_a_video_fitted_to_its_token_budget(model, reference, tmp_path):
    """A clip past its budget keeps 10 of its 12 frames (4 fps), further apart: 0.6 s a temporal
    patch instead of 0.5. transformers places the video's tokens where we do (temporal positions
    floor(k x 0.6 x 2) = 0 1 2 3 4 from the video's start), and the logits agree through the
    video's last token. After it our text continues at the largest position + 1 (the original
    rule, by hand); transformers 5 continues at start + max(h, w) instead (see REFERENCE.md)."""
    rng = np.random.default_rng(9)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
    clip = read_video(tmp_path, fps=4.0, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64,
                      max_tokens=20)  # fmt: skip
    px, grid, second = preprocess_video(clip.frames, clip.fps, size=clip.frames.shape[1:3])
    assert grid.tolist() == [[5, 4, 4]] and second == pytest.approx(0.6)
    ids = build_ids([("text", 4), ("video", tuple(grid[0])), ("text", 6)], rng)
    vision = dict(pixel_values_videos=px, video_grid_thw=grid, second_per_grid_ts=[second])
    ours = model.prepare_prompt(ids, **vision).positions
    mm = torch.tensor((ids == model.config.video_token_id).astype(np.int64) * 2)
    theirs, _ = reference.model.get_rope_index(
        torch.tensor(ids), mm, video_grid_thw=torch.tensor(grid),
        second_per_grid_ts=torch.tensor([second]),
    )  # fmt: skip
    end = int(np.flatnonzero(ids[0] == model.config.video_token_id)[-1]) + 1
    np.testing.assert_array_equal(ours[:, :, :end], theirs.numpy()[:, :, :end])
    assert sorted(set(ours[0, 0, 5:end].tolist())) == [5, 6, 7, 8, 9]  # start 5: 4 text + <vs>
    np.testing.assert_array_equal(ours[:, 0, end:], np.broadcast_to(10 + np.arange(7), (3, 7)))
    hf_vision = {**vision, "second_per_grid_ts": torch.tensor([second])}
    assert_close(
        mlx_logits(model, ids, **vision)[:, :end], hf_logits(reference, ids, **hf_vision)[:, :end]
    )


def test_image_and_video_in_one_prompt(model, reference):
    rng = np.random.default_rng(4)
    image, video = np.array([BELOW_MIN_PIXELS]), np.array([[2, 4, 4]])
    ids = build_ids(
        [("text", 3), ("image", BELOW_MIN_PIXELS), ("video", (2, 4, 4)), ("text", 5)], rng
    )
    px_image, px_video = pixels(image, rng), pixels(video, rng)
    vision = dict(
        pixel_values=px_image,
        image_grid_thw=image,
        pixel_values_videos=px_video,
        video_grid_thw=video,
        second_per_grid_ts=[0.5],
    )
    theirs = hf_logits(reference, ids, **{**vision, "second_per_grid_ts": torch.tensor([0.5])})
    assert_close(mlx_logits(model, ids, **vision), theirs)


def test_batch_of_two_sequences(model, reference):
    rng = np.random.default_rng(5)
    # Same length, different images and text: images are consumed row by row.
    first = build_ids([("text", 4), ("image", (1, 4, 6)), ("text", 3)], rng)
    second = build_ids([("text", 4), ("image", (1, 6, 4)), ("text", 3)], rng)
    ids = np.concatenate([first, second])
    grids = np.array([[1, 4, 6], [1, 6, 4]])
    px = pixels(grids, rng)
    ours = mlx_logits(model, ids, pixel_values=px, image_grid_thw=grids)
    assert_close(ours, hf_logits(reference, ids, pixel_values=px, image_grid_thw=grids))


@pytest.mark.parametrize(
    "schedule",
    [
        VisionSchedule(),
        VisionSchedule(rows=13, score_budget=2 * 4 * 64 * 7),
        VisionSchedule(group_patches=150, steps_per_eval=1),
        VisionSchedule(group_patches=150, steps_per_eval=2, overlapped=True),
        VisionSchedule(group_patches=150, rows=13, score_budget=2 * 4 * 64 * 7),
    ],
    ids=[
        "one-graph",
        "evaluated-pieces",
        "groups-every-half",
        "groups-overlapped",
        "groups-in-pieces",
    ],
)
def test_vision_tower_many_images_and_frames(model, reference, schedule):
    """The tower alone, with images and video frames of different sizes in one call: as one lazy
    graph; as evaluated pieces (13 rows of per-token work, query chunks of 7); in groups of whole
    frames of at most 150 patches (the video's 4 frames of 64 split 2 + 2), evaluated after every
    step of a block, in overlapped stretches of two steps, or in pieces. The same result."""
    rng = np.random.default_rng(6)
    grids = np.array([AWKWARD, [4, 8, 8], BELOW_MIN_PIXELS, [1, 16, 16], [1, 18, 10]])
    px = pixels(grids, rng)
    ours = np.array(encode(model.visual, mx.array(px), grids, schedule))
    with torch.no_grad():
        theirs = reference.model.visual(
            torch.tensor(px), grid_thw=torch.tensor(grids)
        ).pooler_output
    assert np.abs(ours - theirs.numpy()).max() < TOLERANCE


@pytest.mark.parametrize("config_layout", ["text_config", "root"])
@pytest.mark.parametrize("key_layout", ["model", "language_model"])
def test_config_and_key_layouts(config_layout, key_layout, tmp_path):
    """An unusual window size and full-attention set, in each on-disk layout."""
    reference = tiny_hf_model(seed=7, vision=dict(window_size=56, fullatt_block_indexes=[0, 2]))
    folder = save_checkpoint(reference, tmp_path, config_layout, key_layout)
    model = load_model(folder)
    assert model.config.vision.window_size == 56
    assert model.config.vision.fullatt_block_indexes == (0, 2)
    rng = np.random.default_rng(8)
    grids = np.array([AWKWARD, [2, 6, 8]])
    ids = build_ids([("text", 3), ("image", AWKWARD), ("text", 2)], rng)
    ids = np.concatenate([ids, build_ids([("video", (2, 6, 8)), ("text", 2)], rng)], axis=1)
    px_image, px_video = pixels(grids[:1], rng), pixels(grids[1:], rng)
    vision = dict(
        pixel_values=px_image,
        image_grid_thw=grids[:1],
        pixel_values_videos=px_video,
        video_grid_thw=grids[1:],
    )
    assert_close(mlx_logits(model, ids, **vision), hf_logits(reference, ids, **vision))
