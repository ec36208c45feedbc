"""Cached decoding equals one full forward pass, for text and for prompts with images; trimming
returns to any earlier point exactly, rotary offsets included."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from tiny_models import build_ids, mlx_logits, pixels, save_checkpoint, tiny_hf_model

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


def close(a, b) -> bool:
    return np.abs(np.array(a) - np.array(b)).max() < TOLERANCE


def test_step_by_step_decode_equals_full_forward(model):
    ids, vision = image_prompt(np.random.default_rng(0), tail=12)
    full = np.array(mlx_logits(model, ids, **vision))
    prompt_length = ids.shape[1] - 10
    cache = model.make_cache()
    logits = mlx_logits(model, ids[:, :prompt_length], cache=cache, **vision)
    assert close(logits, full[:, :prompt_length])
    for i in range(prompt_length, ids.shape[1]):
        step = model(mx.array(ids[:, i : i + 1]), cache=cache)
        assert close(np.array(step)[:, 0], full[:, i]), f"token {i}"
    assert cache.offset == ids.shape[1]


@pytest.mark.parametrize("size", [1, 7, 16, 61])
def test_chunked_prefill_equals_full_forward(model, size):
    """Chunks cut anywhere, inside the images too, through the model's own call."""
    ids, vision = image_prompt(np.random.default_rng(1), tail=5)
    full = np.array(mlx_logits(model, ids, **vision))
    cache = model.make_cache()
    prompt = model.prepare_prompt(ids, **vision, cache=cache)
    outputs = [
        np.array(model(**prompt.chunk(start, start + size), cache=cache))
        for start in range(0, ids.shape[1], size)
    ]
    assert close(np.concatenate(outputs, axis=1), full)


@pytest.mark.parametrize("keep", [1, 5])
def test_logits_to_keep_gives_the_last_rows(model, keep):
    """Only the last `keep` tokens get logits; the cache still takes every token whole (the
    next step's logits equal a full forward pass)."""
    ids, vision = image_prompt(np.random.default_rng(6), tail=5)
    full = np.array(mlx_logits(model, ids, **vision))
    length = ids.shape[1] - 1
    cache = model.make_cache()
    prompt = model.prepare_prompt(ids[:, :length], **vision, cache=cache)
    last = model(**prompt.chunk(), cache=cache, logits_to_keep=keep)
    assert last.shape == (1, keep, full.shape[-1])
    assert close(last, full[:, length - keep : length])
    assert cache.offset == length
    assert close(model(mx.array(ids[:, length:]), cache=cache)[:, 0], full[:, -1])


def test_cache_grows_past_its_step(model):
    ids = build_ids([("text", 300)], np.random.default_rng(2))
    full = np.array(model(ids))
    cache = model.make_cache()
    model(ids[:, :250], cache=cache)
    for i in range(250, 300):
        step = np.array(model(mx.array(ids[:, i : i + 1]), cache=cache))
        assert close(step[:, 0], full[:, i])


def test_interleaved_conversations_keep_their_own_offsets(model):
    """Two sequences decoded in turns: each keeps its own rope deltas (other runtimes shared them)."""
    rng = np.random.default_rng(3)
    with_images, vision = image_prompt(rng, tail=6)
    text = build_ids([("text", 9)], rng)
    expected = [np.array(mlx_logits(model, with_images, **vision)), np.array(model(text))]
    caches = [model.make_cache(), model.make_cache()]
    mlx_logits(model, with_images[:, :-4], cache=caches[0], **vision)
    model(text[:, :-4], cache=caches[1])
    for k in range(4, 0, -1):
        for seq, ids in enumerate((with_images, text)):
            step = np.array(model(mx.array(ids[:, -k:][:, :1]), cache=caches[seq]))
            assert close(step[:, 0], expected[seq][:, -k])


def test_new_image_in_a_later_turn(model):
    """A second turn that brings an image continues positions from the cached first turn."""
    rng = np.random.default_rng(4)
    ids, vision = image_prompt(rng, tail=3)
    full = np.array(mlx_logits(model, ids, **vision))
    split = 8 + 45  # after the first image's end token: the first turn carries image 1 only
    first_image = {k: v[:180] if k == "pixel_values" else v[:1] for k, v in vision.items()}
    second_image = {k: v[180:] if k == "pixel_values" else v[1:] for k, v in vision.items()}
    cache = model.make_cache()
    mlx_logits(model, ids[:, :split], cache=cache, **first_image)
    later = mlx_logits(model, ids[:, split:], cache=cache, **second_image)
    assert close(later, full[:, split:])


@pytest.mark.parametrize("keep", [3, 4, 20, 53, 60, 63, 66])
def test_trim_returns_to_any_point(model, keep):
    """Trim back to `keep` tokens (in text, inside an image, right after one), then feed the rest
    again: the logits equal a full forward pass."""
    ids, vision = image_prompt(np.random.default_rng(5), tail=6)
    full = np.array(mlx_logits(model, ids, **vision))
    cache = model.make_cache()
    prompt = model.prepare_prompt(ids, **vision, cache=cache)
    model(**prompt.chunk(), cache=cache)
    for _ in range(3):  # decode a few tokens beyond the prompt, then forget them too
        model(mx.array([[5]]), cache=cache)
    assert cache.trim(cache.offset - keep) == ids.shape[1] + 3 - keep
    assert cache.offset == keep
    again = model(**prompt.chunk(keep), cache=cache)
    assert close(again, full[:, keep:])


def test_trim_bookkeeping_matches_positions():
    """The next text position after a trim, worked out by hand for a b <vs> [2x2 image] <ve>."""
    from mimo_mlx.model.cache import PromptCache

    positions = np.array(
        [
            [0, 1, 2, 3, 3, 3, 3, 5],  # temporal
            [0, 1, 2, 3, 3, 4, 4, 5],  # height
            [0, 1, 2, 3, 4, 3, 4, 5],  # width
        ]
    )[:, None]  # (3, 1, 8)
    cache = PromptCache(num_layers=1)
    cache.record_positions(positions)
    cache.layers[0].offset = 8  # as if the tokens went through the layers
    assert cache.rope_deltas.tolist() == [6 - 8]
    expected_next = {8: 6, 7: 5, 6: 5, 5: 5, 4: 4, 3: 3, 2: 2, 0: 0}
    for keep in sorted(expected_next, reverse=True):
        cache.trim(cache.offset - keep)
        assert cache.next_positions(1).tolist() == [expected_next[keep]], keep


def test_truncate_after_a_pass_stopped_midway(model):
    """A forward pass stopped between two layers (Ctrl-C) leaves layer 0 one chunk ahead and the
    chunk's positions recorded: truncating to the shortest layer forgets the chunk everywhere,
    and feeding it again gives the logits of a full forward pass."""
    ids, vision = image_prompt(np.random.default_rng(6), tail=6)
    full = np.array(mlx_logits(model, ids, **vision))
    cache = model.make_cache()
    prompt = model.prepare_prompt(ids, **vision, cache=cache)
    model(**prompt.chunk(0, 30), cache=cache)
    cache.record_positions(prompt.chunk(30)["positions"])  # what the model does first
    layer = cache.layers[0]
    layer.update_and_fetch(*(mx.zeros((1, 2, ids.shape[1] - 30, 16)),) * 2)  # then layer 0
    assert [c.offset for c in cache.layers] == [ids.shape[1], 30]
    assert cache.truncate(ids.shape[1]) == 30
    assert [c.offset for c in cache.layers] == [30, 30]
    again = model(**prompt.chunk(30), cache=cache)
    assert close(again, full[:, 30:])
