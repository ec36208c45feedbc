"""Several sequences generated together: each one's tokens are its solo `generate` tokens.

In float32 on the CPU (MLX's own BLAS) a batched decode step computes each row as that row alone
computes it, and masked padding adds exact zeros, so the checks here are exact: tokens equal, and
log-probabilities equal bit for bit.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from distributed_folders import write_quantized_folder
from PIL import Image
from test_generate import MAX_PIXELS, sample_images, write_model_folder
from tiny_models import WIDE_HEADS

import mimo_mlx
from mimo_mlx import MimoError
from mimo_mlx.generation.batch import BatchGenerator, batch_generate, prompt_steps
from mimo_mlx.generation.loop import generate_step, stream_generate
from mimo_mlx.model.batch_cache import BatchCache
from mimo_mlx.model.cache import PromptCache

PIXELS = dict(max_pixels=MAX_PIXELS)
VIDEO_LIMITS = dict(video_min_pixels=28 * 28 * 4, video_max_pixels=28 * 28 * 16, fps=2.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return mimo_mlx.load(write_model_folder(tmp_path_factory.mktemp("tiny-batch"), seed=21))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Two images of awkward sizes and a video of 4 frames (2 temporal patches)."""
    folder = tmp_path_factory.mktemp("batch-media")
    images = sample_images(folder)
    frames = folder / "frames"
    frames.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)).save(frames / f"{i}.png")
    return images, frames


def requests(media) -> dict[str, dict]:
    """Text only, one image, two images, a video, and two more texts: prompts of different
    lengths, images of different sizes."""
    images, frames = media
    return {
        "text": dict(prompt="Tell me a story.", max_tokens=24),
        "image": dict(
            prompt="What is in this picture?", images=images[:1], max_tokens=20, **PIXELS
        ),
        "two images": dict(
            prompt="Compare the two pictures.", images=images, max_tokens=16, **PIXELS
        ),
        "video": dict(prompt="What happens here?", videos=[frames], max_tokens=20, **VIDEO_LIMITS),
        "cancelled": dict(prompt="Write a long poem about the sea.", max_tokens=40),
        "late": dict(prompt="Hi", max_tokens=18),
    }


def solo(model, processor, request: dict) -> tuple[list[int], np.ndarray]:
    """Tokens and log-probabilities of the request generated alone."""
    responses = list(stream_generate(model, processor, **request))
    return [r.token for r in responses], np.stack([np.array(r.logprobs) for r in responses])


def insert(batch: BatchGenerator, model, processor, request: dict) -> int:
    """Queue a request as `batch_generate` does: prepared now, its vision pass inside `next`, in
    pieces of at most 8 merged tokens (the video's two temporal patches one at a time)."""
    request = dict(request)
    prompt, images = request.pop("prompt"), request.pop("images", ())
    videos, max_tokens = request.pop("videos", ()), request.pop("max_tokens")
    inputs = processor.prepare(prompt, images, videos, **request)
    cache = model.make_cache()
    return batch.insert(
        lambda: prompt_steps(model, inputs, cache, 8), prompt_cache=cache, max_tokens=max_tokens
    )


def run(batch: BatchGenerator, outputs: dict, until=lambda: False) -> None:
    """Step until `until()` or nothing is left; tokens and log-probabilities by uid."""
    while batch.has_work and not until():
        for item in batch.next():
            assert item.error is None, item.error
            outputs.setdefault(item.uid, []).append(item.response)


def test_mixed_batch_with_joins_and_a_cancel_equals_solo_runs(tiny, media):
    model, processor = tiny
    wanted = requests(media)
    expected = {name: solo(model, processor, request) for name, request in wanted.items()}
    for name in ("text", "image", "two images", "video"):
        assert len(expected[name][0]) == wanted[name]["max_tokens"], "pick a longer answer"

    outputs: dict[int, list] = {}
    most = 0

    def step(batch: BatchGenerator) -> None:
        nonlocal most
        for item in batch.next():
            assert item.error is None, item.error
            outputs.setdefault(item.uid, []).append(item.response)
        most = max(most, batch.active)

    with BatchGenerator(model, processor.tokenizer, max_batch=3, prefill_step_size=32) as batch:
        uids = {name: insert(batch, model, processor, wanted[name]) for name in ("text", "video")}

        def count(name):
            return len(outputs.get(uids[name], []))

        while count("text") < 4:
            step(batch)
        for name in ("image", "two images", "cancelled"):  # they join mid-way
            uids[name] = insert(batch, model, processor, wanted[name])
        while count("cancelled") < 5:
            step(batch)
        assert batch.remove(uids["cancelled"])
        assert not batch.remove(uids["cancelled"])
        uids["late"] = insert(batch, model, processor, wanted["late"])
        while batch.has_work:
            step(batch)
    assert most == 3  # the batch was full: sequences really decoded together

    for name, uid in uids.items():
        tokens = [r.token for r in outputs[uid]]
        logprobs = np.stack([np.array(r.logprobs) for r in outputs[uid]])
        solo_tokens, solo_logprobs = expected[name]
        if name == "cancelled":
            assert 5 <= len(tokens) < len(solo_tokens)
            solo_tokens, solo_logprobs = solo_tokens[: len(tokens)], solo_logprobs[: len(tokens)]
        assert tokens == solo_tokens, name
        np.testing.assert_array_equal(logprobs, solo_logprobs, err_msg=name)
        last = outputs[uid][-1]
        assert last.finish_reason == (None if name == "cancelled" else "length")
    assert batch.active == 0 and not batch.has_work


def test_batch_generate_matches_generate(tiny, media):
    """The library call: per-prompt options over shared ones, results in order; on_response
    sees every step of each prompt, under its index."""
    model, processor = tiny
    wanted = list(requests(media).values())
    prompts = [{**request, "max_tokens": 12} for request in wanted]
    seen: dict[int, list[int]] = {}  # what on_response saw, by the prompt's index
    results = batch_generate(
        model, processor, prompts, max_batch=4, repetition_penalty=1.2,
        on_response=lambda i, response: seen.setdefault(i, []).append(response.token),
    )  # fmt: skip
    assert seen == {i: result.tokens for i, result in enumerate(results)}
    for request, result in zip(prompts, results, strict=True):
        alone = mimo_mlx.generate(model, processor, **request, repetition_penalty=1.2)
        assert result.tokens == alone.tokens
        assert result.text == alone.text and result.answer == alone.answer
        assert result.stats.prompt_tokens == alone.stats.prompt_tokens


def test_seeded_sampling_draws_as_alone(tiny):
    """Each seeded row keeps its own random state: the same draws as its solo run, whatever the
    other rows draw (two of them share the seed and still draw apart from each other)."""
    model, processor = tiny
    prompts = [
        dict(prompt="Hi", temp=1.0, seed=5, max_tokens=16),
        dict(prompt="Tell me a story.", temp=0.8, top_p=0.9, seed=5, max_tokens=16),
        dict(prompt="Hello there", temp=1.2, top_k=20, seed=11, max_tokens=16),
        dict(prompt="Greedy among them", max_tokens=16),
    ]
    results = batch_generate(model, processor, prompts)
    for request, result in zip(prompts, results, strict=True):
        assert result.tokens == mimo_mlx.generate(model, processor, **request).tokens


def test_structured_rows_follow_their_own_schemas(tiny):
    """Each row masks with its own grammar (one Constraint each), beside an unconstrained row."""
    pytest.importorskip("llguidance")
    model, processor = tiny
    pick = {
        "type": "object",
        "properties": {"pick": {"enum": ["red", "green"]}},
        "required": ["pick"],
        "additionalProperties": False,
    }
    prompts = [
        dict(prompt="Pick a colour.", json_schema=pick, no_think=True, max_tokens=80),
        dict(prompt="Tell me a story.", max_tokens=30),
        dict(prompt="Pick a colour!", json_schema=pick, no_think=True, max_tokens=80),
    ]
    results = batch_generate(model, processor, prompts)
    for request, result in zip(prompts, results, strict=True):
        assert result.tokens == mimo_mlx.generate(model, processor, **request).tokens
    for result in (results[0], results[2]):
        assert result.stats.finish_reason == "stop"
        assert json.loads(result.answer) in ({"pick": "red"}, {"pick": "green"})


def test_a_long_prefill_is_interleaved_with_running_decodes(tiny):
    """While a long prompt is prefilled chunk by chunk, the running sequence gets a token at
    every step; the prompt's last chunk runs in the same pass as that step (one pass, not two),
    and the new sequence's first token comes with the next step."""
    model, processor = tiny
    rng = np.random.default_rng(3)
    long_ids, short_ids = rng.integers(0, 390, (1, 100)), rng.integers(0, 390, (1, 6))
    tokens: dict[int, list[int]] = {}

    def step(batch) -> list[int]:
        items = batch.next()
        for item in items:
            tokens.setdefault(item.uid, []).append(item.response.token)
        return sorted(item.uid for item in items)

    with BatchGenerator(model, processor.tokenizer, prefill_step_size=8) as batch:
        short = batch.insert(model.prepare_prompt(short_ids), max_tokens=40)
        assert step(batch) == [short]  # prefilled in one chunk
        long = batch.insert(model.prepare_prompt(long_ids), max_tokens=6)
        chunks = -(-long_ids.shape[1] // 8)
        for _ in range(chunks - 1):
            assert step(batch) == [short]
            assert batch.active == 1
        assert step(batch) == [short]  # and the last chunk
        assert batch.active == 2
        assert step(batch) == sorted([short, long])
        while batch.has_work:
            step(batch)
    # Its last chunk, computed with another sequence's step, gives the tokens it gives alone.
    for uid, ids, count in ((long, long_ids, 6), (short, short_ids, 40)):
        alone = [token for token, _ in generate_step(ids, model, max_tokens=count)]
        assert tokens[uid] and tokens[uid] == alone[: len(tokens[uid])]  # an end token stops it


def test_a_decoding_sequence_keeps_nothing_of_its_prompt(tiny, media):
    """Once a sequence has joined the batch, its prepared inputs (pixels, features) are freed
    at once, not left to the garbage collector: a server runs many sequences one after another,
    and what waited for a collection grew its process by about 5 MB a request (896x896 images)."""
    import gc
    import weakref

    model, processor = tiny
    images, _ = media
    inputs = processor.prepare("What is in this picture?", images[:1], (), **PIXELS)
    alive = weakref.ref(inputs)
    cache = model.make_cache()
    gc.disable()
    try:
        with BatchGenerator(model, processor.tokenizer) as batch:
            batch.insert(
                lambda inputs=inputs: prompt_steps(model, inputs, cache, 8),
                prompt_cache=cache,
                max_tokens=30,
            )
            del inputs
            while not batch.active:
                batch.next()
            batch.next()
            assert batch.active == 1 and alive() is None
    finally:
        gc.enable()


def test_the_prompt_cache_gets_the_answer_back(tiny, media):
    """A cache given to `insert` ends as `generate_step` leaves it: the prompt and the answer,
    rotary bookkeeping included, bit for bit; and nothing of the batch stays behind."""
    model, processor = tiny
    request = requests(media)["image"]
    inputs = processor.prepare(request["prompt"], request["images"], **PIXELS)
    alone = model.make_cache()
    tokens = [
        r.token
        for r in stream_generate(
            model, processor, "", inputs=inputs, max_tokens=10, prompt_cache=alone
        )
    ]

    other = processor.prepare("Tell me a story.")
    with BatchGenerator(model, processor.tokenizer) as batch:
        cache = model.make_cache()
        batch.insert(model.prepare_prompt(other.input_ids), max_tokens=30)
        batch.next()
        uid = batch.insert(
            model.prepare_prompt(inputs.input_ids, **inputs.vision_kwargs(), cache=cache),
            prompt_cache=cache,
            max_tokens=10,
        )
        outputs: dict[int, list] = {}
        run(batch, outputs, until=lambda: len(outputs.get(uid, [])) == 10)
        assert batch.active == 1
    assert [r.token for r in outputs[uid]] == tokens
    # Alone, the last token is never fed; here the step that feeds it was already queued.
    assert cache.offset == alone.offset + 1
    np.testing.assert_array_equal(cache.rope_deltas, alone.rope_deltas)
    for mine, theirs in zip(cache.state, alone.state, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            assert a.shape[0] == 1
            np.testing.assert_array_equal(np.array(a[:, :, : alone.offset]), np.array(b))


def test_a_failing_sequence_leaves_the_others_alone(tiny):
    model, processor = tiny
    ids = processor.prepare("Tell me a story.").input_ids
    expected = [
        t for t in solo(model, processor, dict(prompt="Tell me a story.", max_tokens=12))[0]
    ]
    with BatchGenerator(model, processor.tokenizer) as batch:
        good = batch.insert(model.prepare_prompt(ids), max_tokens=12)
        bad = batch.insert(model.prepare_prompt(np.concatenate([ids, ids])), max_tokens=12)
        outputs, errors = {}, {}
        while batch.has_work:
            for item in batch.next():
                if item.error is not None:
                    errors[item.uid] = item.error
                else:
                    outputs.setdefault(item.uid, []).append(item.response.token)
    assert list(errors) == [bad] and "one prompt" in str(errors[bad])
    assert outputs == {good: expected}


def test_what_a_batch_refuses(tiny):
    model, processor = tiny
    with pytest.raises(MimoError, match="prompt lookup is not available in a batch"):
        batch_generate(model, processor, ["Hi"], prompt_lookup=True)
    with pytest.raises(MimoError, match="a dict with a 'prompt'"):
        batch_generate(model, processor, [{"images": []}])
    with pytest.raises(MimoError, match="max_batch must be at least 1"):
        BatchGenerator(model, processor.tokenizer, max_batch=0)
    with pytest.raises(TypeError, match="unknown option"):
        batch_generate(model, processor, ["Hi"], temperature=0.5)


def test_batch_cache_pads_rows_and_hands_them_back():
    """Rows of different lengths share columns, left-padded; each keeps its own positions; a row
    that leaves gets exactly its own tokens back and the padding no row needs is dropped."""
    rng = np.random.default_rng(0)

    def filled(length: int, delta: int) -> PromptCache:
        cache = PromptCache(2)
        for layer in cache.layers:
            layer.update_and_fetch(
                *(mx.array(rng.standard_normal((1, 2, length, 4))) for _ in "kv")
            )
        if delta:  # as after an image: text continues `delta` past the token count
            positions = np.broadcast_to(
                np.arange(length) + np.r_[0, [delta] * (length - 1)], (3, 1, length)
            )
            cache._marks = [(0, np.maximum.accumulate(positions.max(axis=0) + 1, axis=-1))]
        return cache

    short, long = filled(3, 5), filled(7, 0)
    arrays = {
        id(c): [tuple(np.array(p) for p in layer) for layer in c.state] for c in (short, long)
    }
    batch = BatchCache(2)
    batch.add(short)
    batch.add(long)
    assert short.offset == 0 and long.offset == 0  # the batch holds their tokens now
    assert batch.offset == 7 and batch.padding.tolist() == [4, 0]
    assert batch.next_positions(2).tolist() == [3 + 5, 7]
    mask = np.array(batch.attention_mask(1))[:, 0, 0]
    assert mask.tolist() == [[False] * 4 + [True] * 4, [True] * 8]
    with pytest.raises(ValueError, match="one token per row"):
        batch.attention_mask(2)
    assert batch.remove([1]) == [long]
    assert batch.offset == 3 and batch.padding.tolist() == [0]  # the padding went with it
    assert batch.attention_mask(1) is None
    assert batch.remove([0]) == [short] and len(batch) == 0 and batch.nbytes == 0
    for cache in (short, long):
        for layer, expected in zip(cache.state, arrays[id(cache)], strict=True):
            for got, want in zip(layer, expected, strict=True):
                np.testing.assert_array_equal(np.array(got), want)
    assert short.next_positions(1).tolist() == [3 + 5]


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Heads of 128 dimensions: every group size (32, 64, 128) divides them."""
    folder = tmp_path_factory.mktemp("tiny-batch-kv")
    return mimo_mlx.load(write_model_folder(folder, seed=72, sizes=WIDE_HEADS))


def test_quantized_caches_decode_in_a_batch_as_alone(wide, media):
    """Rows with 8-bit caches (a text and an image: rows of different lengths, padded), 4-bit
    ones (groups of 64; one quantized only from its 30th token on, when it moves into the other's
    batch) and a float row: each gives its solo tokens and log-probabilities, bit for bit, and
    the caches handed back are stored as they would be alone."""
    model, processor = wide
    images, _ = media
    prompts = [
        dict(prompt="Tell me a story.", kv_bits=8, max_tokens=14),
        dict(prompt="What is in this picture?", images=images[:1], kv_bits=8, max_tokens=14)
        | PIXELS,
        dict(prompt="Hello there, how are you?", kv_bits=4, quantized_kv_start=30, max_tokens=14),
        dict(prompt="Hi", max_tokens=14),
        dict(prompt="Write a poem.", kv_bits=4, max_tokens=14),
    ]
    expected = [solo(model, processor, request) for request in prompts]
    with BatchGenerator(model, processor.tokenizer, max_batch=5) as batch:
        caches, uids = [], []
        for request in prompts:
            request = dict(request)
            prompt, images_ = request.pop("prompt"), request.pop("images", ())
            max_tokens = request.pop("max_tokens")
            cache_options = {k: request.pop(k) for k in list(request) if k.startswith(("kv", "q"))}
            inputs = processor.prepare(prompt, images_, **request)
            cache = model.make_cache(**cache_options)
            uids.append(
                batch.insert(
                    lambda i=inputs, c=cache: prompt_steps(model, i, c, 8),
                    prompt_cache=cache,
                    max_tokens=max_tokens,
                )
            )
            caches.append(cache)
        outputs: dict[int, list] = {}
        rows = []
        while batch.has_work:
            for item in batch.next():
                assert item.error is None, item.error
                outputs.setdefault(item.uid, []).append(item.response)
            rows.append({str(k): len(g.rows) for k, g in batch._groups.items()})
    assert {"None": 1, "(8, 64)": 2, "(4, 64)": 2} in rows  # every kind decoded side by side
    for uid, (tokens, logprobs) in zip(uids, expected, strict=True):
        assert [r.token for r in outputs[uid]] == tokens
        np.testing.assert_array_equal(
            np.stack([np.array(r.logprobs) for r in outputs[uid]]), logprobs
        )
    assert [c.quantized for c in caches] == [True, True, True, False, True]
    assert caches[2].offset > 30  # it crossed quantized_kv_start inside the batch


def test_a_4bit_model_batches_as_alone(tmp_path, media):
    """A converted 4-bit model (quantized matmuls): five requests, three at a time, so two join
    while the others decode, their prompts (one with an image) riding in the running rows'
    pass; each gives its solo tokens."""
    model, processor = mimo_mlx.load(write_quantized_folder(tmp_path / "4bit", group_size=32))
    images, _ = media
    prompts = [
        dict(prompt="Hello there.", max_tokens=12),
        dict(prompt="Tell me a story about a cat.", max_tokens=12),
        dict(prompt="Count to ten.", max_tokens=12),
        dict(prompt="What is in this picture?", images=images[:1], max_tokens=12) | PIXELS,
        dict(prompt="Name a colour.", max_tokens=12),
    ]
    results = batch_generate(model, processor, prompts, max_batch=3)
    for request, result in zip(prompts, results, strict=True):
        assert result.tokens == mimo_mlx.generate(model, processor, **request).tokens
