"""Cached decoding equals one full forward pass, for text and for prompts with images."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from tiny_models import build_ids, pixels, save_checkpoint, tiny_hf_model

from mimo_mlx import load_model

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(save_checkpoint(tiny_hf_model(seed=3), tmp_path_factory.mktemp("tiny")))


def image_prompt(rng, tail: int):
    grids = np.array([[1, 10, 18], [1, 4, 6]])
    ids = build_ids(
        [("text", 4), ("image", (1, 10, 18)), ("text", 2), ("image", (1, 4, 6)), ("text", tail)],
        rng,
    )
    return ids, dict(pixel_values=pixels(grids, rng), image_grid_thw=grids)


def test_step_by_step_decode_equals_full_forward(model):
    ids, vision = image_prompt(np.random.default_rng(0), tail=12)
    full = np.array(model(ids, **vision))
    prompt_length = ids.shape[1] - 10
    cache = model.make_cache()
    logits = model(ids[:, :prompt_length], **vision, cache=cache)
    assert np.abs(np.array(logits) - full[:, :prompt_length]).max() < TOLERANCE
    for i in range(prompt_length, ids.shape[1]):
        step = model(mx.array(ids[:, i : i + 1]), cache=cache)
        assert np.abs(np.array(step)[:, 0] - full[:, i]).max() < TOLERANCE, f"token {i}"
    assert cache.offset == ids.shape[1]


def test_chunked_prefill_equals_full_forward(model):
    ids, vision = image_prompt(np.random.default_rng(1), tail=5)
    full = np.array(model(ids, **vision))
    prepared = model.prepare_inputs(ids, **vision)
    cache = model.make_cache()
    outputs = []
    for start in range(0, ids.shape[1], 16):
        end = start + 16
        hidden = model.model(
            prepared.embeds[:, start:end], prepared.positions[:, :, start:end], cache.layers
        )
        outputs.append(np.array(model.logits(hidden)))
    assert np.abs(np.concatenate(outputs, axis=1) - full).max() < TOLERANCE


def test_cache_grows_past_its_step(model):
    ids = build_ids([("text", 300)], np.random.default_rng(2))
    full = np.array(model(ids))
    cache = model.make_cache()
    model(ids[:, :250], cache=cache)
    for i in range(250, 300):
        step = np.array(model(mx.array(ids[:, i : i + 1]), cache=cache))
        assert np.abs(step[:, 0] - full[:, i]).max() < TOLERANCE


def test_interleaved_conversations_keep_their_own_offsets(model):
    """Two sequences decoded in turns: each keeps its own rope deltas (other runtimes shared them)."""
    rng = np.random.default_rng(3)
    with_images, vision = image_prompt(rng, tail=6)
    text = build_ids([("text", 9)], rng)
    expected = [np.array(model(with_images, **vision)), np.array(model(text))]
    caches = [model.make_cache(), model.make_cache()]
    model(with_images[:, :-4], **vision, cache=caches[0])
    model(text[:, :-4], cache=caches[1])
    for k in range(4, 0, -1):
        for seq, ids in enumerate((with_images, text)):
            step = np.array(model(mx.array(ids[:, -k:][:, :1]), cache=caches[seq]))
            assert np.abs(step[:, 0] - expected[seq][:, -k]).max() < TOLERANCE


def test_new_image_in_a_later_turn(model):
    """A second turn that brings an image continues positions from the cached first turn."""
    rng = np.random.default_rng(4)
    ids, vision = image_prompt(rng, tail=3)
    full = np.array(model(ids, **vision))
    split = 8  # after the first image's end token: the first turn carries image 1 only
    first_image = {k: v[:180] if k == "pixel_values" else v[:1] for k, v in vision.items()}
    second_image = {k: v[180:] if k == "pixel_values" else v[1:] for k, v in vision.items()}
    cache = model.make_cache()
    model(ids[:, : split + 45], **first_image, cache=cache)
    later = np.array(model(ids[:, split + 45 :], **second_image, cache=cache))
    assert np.abs(later - full[:, split + 45 :]).max() < TOLERANCE
