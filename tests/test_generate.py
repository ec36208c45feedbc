"""Greedy generation through the chat template, token for token against transformers' generate."""

from __future__ import annotations

import dataclasses
import json

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from tiny_models import TOKENS, save_checkpoint, tiny_hf_model
from tiny_tokenizer import build_tiny_tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import mimo_mlx
from mimo_mlx.errors import ContextFull
from mimo_mlx.generation.loop import generate, stream_generate
from mimo_mlx.generation.sampling import make_logits_processors

NEW_TOKENS = 24
MAX_PIXELS = 28 * 28 * 64


def write_model_folder(folder, seed: int, sizes: dict | None = None):
    """A tiny model folder with tokenizer; `sizes`: tiny_hf_model's text/vision/rope overrides
    (e.g. tiny_models.WIDE_HEADS)."""
    save_checkpoint(tiny_hf_model(seed=seed, **(sizes or {})), folder)
    build_tiny_tokenizer(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "Qwen2VLImageProcessor",
                "min_pixels": 3136,
                "max_pixels": MAX_PIXELS,
                "patch_size": 14,
                "temporal_patch_size": 2,
                "merge_size": 2,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
            }
        )
    )
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_model_folder(tmp_path_factory.mktemp("tiny-generate"), seed=21)


@pytest.fixture(scope="module")
def ours(folder):
    return mimo_mlx.load(folder)


@pytest.fixture(scope="module")
def reference(folder):
    return hf_reference(folder)


def hf_reference(folder):
    """transformers' model and processor for a tiny model folder (images at MAX_PIXELS)."""
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)

    class ImagesOnly(transformers.Qwen2_5_VLProcessor):
        # The video processor needs torchvision, which the test environment lacks; a stub with
        # merge_size stands in for it (videos are fed as pixels below).
        def check_argument_for_proper_class(self, argument_name, argument):
            return type(argument)

    image_processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=MAX_PIXELS)
    processor = ImagesOnly(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=type("VideoStub", (), {"merge_size": 2, "temporal_patch_size": 2})(),
        chat_template=tokenizer.chat_template,
    )
    return model, processor


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return sample_images(tmp_path_factory.mktemp("images"))


def sample_images(folder):
    """Two smooth random images of awkward sizes (131x257 and 60x90), as PNG files."""
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(131, 257), (60, 90)]):
        smooth = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(smooth).resize((w, h), Image.BILINEAR)
        paths.append(folder / f"image{i}.png")
        image.save(paths[-1])
    return paths


def hf_messages(prompt: str, images: int = 0, videos: int = 0):
    content = [{"type": "image"}] * images + [{"type": "video"}] * videos
    return [{"role": "user", "content": [*content, {"type": "text", "text": prompt}]}]


def hf_generate(model, inputs: dict, **options) -> list[int]:
    """transformers' greedy tokens (`options` go to generate, e.g. repetition_penalty)."""
    ids = inputs["input_ids"]
    mm = torch.zeros_like(ids)
    mm[ids == TOKENS["image_token_id"]] = 1
    mm[ids == TOKENS["video_token_id"]] = 2
    kwargs = {k: v for k, v in inputs.items() if k not in ("mm_token_type_ids", "attention_mask")}
    with torch.no_grad():
        out = model.generate(
            **kwargs, mm_token_type_ids=mm, max_new_tokens=NEW_TOKENS, do_sample=False, **options
        )
    return out[0, ids.shape[1] :].tolist()


def assert_same_tokens(ours: list[int], theirs: list[int]) -> None:
    assert len(theirs) >= NEW_TOKENS, "pick another prompt: the reference stopped early"
    assert ours == theirs


@pytest.mark.parametrize("count", [0, 1, 2])
def test_greedy_matches_transformers_with_images(ours, reference, images, count):
    model, processor = ours
    hf_model, hf_processor = reference
    prompt = ["Tell me a story.", "What is in this picture?", "Compare the two pictures."][count]
    text = hf_processor.apply_chat_template(
        hf_messages(prompt, images=count), add_generation_prompt=True, tokenize=False
    )
    pil = [Image.open(p) for p in images[:count]]
    hf_inputs = hf_processor(text=[text], images=pil or None, return_tensors="pt")
    result = generate(
        model, processor, prompt, images[:count], max_tokens=NEW_TOKENS, max_pixels=MAX_PIXELS
    )
    inputs = processor.prepare(prompt, images[:count], max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(inputs.input_ids, hf_inputs["input_ids"].numpy())
    assert_same_tokens(result.tokens, hf_generate(hf_model, dict(hf_inputs)))


def test_greedy_matches_transformers_with_a_video(ours, reference, tmp_path):
    model, processor = ours
    hf_model, hf_processor = reference
    rng = np.random.default_rng(1)
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(4):  # 4 frames at 2 fps: 2 temporal patches, 1 s each
        Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)).save(frames / f"{i}.png")
    prompt = "What happens in this video?"
    limits = dict(video_min_pixels=28 * 28 * 4, video_max_pixels=28 * 28 * 16)
    inputs = processor.prepare(prompt, videos=[frames], fps=2.0, **limits)
    assert inputs.video_grid_thw.tolist() == [[2, 4, 6]] and inputs.second_per_grid_ts == [1.0]
    text = hf_processor.apply_chat_template(
        hf_messages(prompt, videos=1), add_generation_prompt=True, tokenize=False
    )
    text = text.replace("<|video_pad|>", "<|video_pad|>" * 12)  # 2 * 4 * 6 / 4 tokens
    hf_ids = hf_processor.tokenizer(text, return_tensors="pt")["input_ids"]
    np.testing.assert_array_equal(inputs.input_ids, hf_ids.numpy())
    hf_inputs = dict(
        input_ids=hf_ids,
        pixel_values_videos=torch.tensor(inputs.pixel_values_videos),
        video_grid_thw=torch.tensor(inputs.video_grid_thw),
        second_per_grid_ts=torch.tensor(inputs.second_per_grid_ts),
    )
    result = generate(model, processor, prompt, inputs=inputs, max_tokens=NEW_TOKENS)
    assert_same_tokens(result.tokens, hf_generate(hf_model, hf_inputs))


def test_greedy_matches_transformers_with_an_image_and_two_videos(
    ours, reference, images, tmp_path
):
    """An image, a 6-frame clip and a one-frame clip (padded to one temporal patch) in one prompt,
    in the order given: ids from transformers' template and processor rules, the image's pixels
    from its image processor, and greedy tokens from its model."""
    model, processor = ours
    hf_model, hf_processor = reference
    rng = np.random.default_rng(2)
    clips = []
    for name, count, size in (("clip", 6, (56, 84)), ("still", 1, (84, 56))):
        clips.append(tmp_path / name)
        clips[-1].mkdir()
        for i in range(count):
            frame = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
            Image.fromarray(frame).save(clips[-1] / f"{i}.png")
    prompt = "Which clip shows the picture?"
    limits = dict(video_min_pixels=28 * 28 * 4, video_max_pixels=28 * 28 * 16)
    # At 4 fps a temporal patch is 0.5 s, one position at 2 tokens/s: the clip's temporal extent
    # stays within its grid. (Beyond it, transformers 5 continues text at start + max(h, w) where
    # the original rule, ours, continues at the largest position + 1: see test_mrope.)
    inputs = processor.prepare(prompt, images[:1], clips, max_pixels=MAX_PIXELS, fps=4.0, **limits)
    assert inputs.video_grid_thw.tolist() == [[3, 4, 6], [1, 6, 4]]
    assert inputs.second_per_grid_ts == [0.5, 0.5]
    text = hf_processor.apply_chat_template(
        hf_messages(prompt, images=1, videos=2), add_generation_prompt=True, tokenize=False
    )
    image = hf_processor.image_processor(images=[Image.open(images[0])], return_tensors="np")
    t, h, w = image["image_grid_thw"][0]
    counts = [t * h * w // 4, 3 * 4 * 6 // 4, 1 * 6 * 4 // 4]  # the image's, then each video's
    parts = text.replace("<|video_pad|>", "<|image_pad|>").split("<|image_pad|>")
    pads = ["<|image_pad|>" * counts[0], *("<|video_pad|>" * c for c in counts[1:])]
    expanded = parts[0] + "".join(p + rest for p, rest in zip(pads, parts[1:], strict=True))
    hf_ids = hf_processor.tokenizer(expanded, return_tensors="pt")["input_ids"]
    np.testing.assert_array_equal(inputs.input_ids, hf_ids.numpy())
    np.testing.assert_array_equal(inputs.pixel_values, image["pixel_values"])
    hf_inputs = dict(
        input_ids=hf_ids,
        pixel_values=torch.tensor(image["pixel_values"]),
        image_grid_thw=torch.tensor(image["image_grid_thw"]),
        pixel_values_videos=torch.tensor(inputs.pixel_values_videos),
        video_grid_thw=torch.tensor(inputs.video_grid_thw),
        second_per_grid_ts=torch.tensor(inputs.second_per_grid_ts),
    )
    result = generate(model, processor, prompt, inputs=inputs, max_tokens=NEW_TOKENS)
    assert_same_tokens(result.tokens, hf_generate(hf_model, hf_inputs))


def test_stops_at_an_end_token(ours, reference):
    """Decode until <|im_end|>: the stream ends with finish_reason 'stop' exactly where transformers
    stops."""
    model, processor = ours
    hf_model, hf_processor = reference
    prompt = "Tell me a story."
    inputs = processor.prepare(prompt)
    hf_tokens = hf_generate(hf_model, {"input_ids": torch.tensor(inputs.input_ids)})
    # Make the reference's 5th greedy token an end token for both, through the tokenizer's stop set.
    stop = hf_tokens[4]
    original = processor.tokenizer.eos_token_ids
    processor.tokenizer.eos_token_ids = frozenset({stop})
    try:
        responses = list(stream_generate(model, processor, prompt, max_tokens=NEW_TOKENS))
    finally:
        processor.tokenizer.eos_token_ids = original
    assert [r.token for r in responses] == hf_tokens[: hf_tokens.index(stop) + 1]
    assert responses[-1].finish_reason == "stop"
    assert responses[-1].generation_tokens == len(responses)


def test_log_probabilities_match_transformers_when_read_late(ours, reference, images):
    """Greedy steps leave their log-probabilities lazy; read after the whole answer (the cache
    has moved on since), they equal transformers' log-softmax of its scores at every step."""
    model, processor = ours
    hf_model, hf_processor = reference
    prompt = "What is in this picture?"
    text = hf_processor.apply_chat_template(
        hf_messages(prompt, images=1), add_generation_prompt=True, tokenize=False
    )
    hf_inputs = hf_processor(text=[text], images=[Image.open(images[0])], return_tensors="pt")
    ids = hf_inputs["input_ids"]
    kwargs = {
        k: v for k, v in hf_inputs.items() if k not in ("mm_token_type_ids", "attention_mask")
    }
    with torch.no_grad():
        out = hf_model.generate(
            **kwargs,
            mm_token_type_ids=(ids == TOKENS["image_token_id"]).long(),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    theirs = [torch.log_softmax(step[0].float(), dim=-1).numpy() for step in out.logits]
    responses = list(
        stream_generate(
            model, processor, prompt, images[:1], max_tokens=NEW_TOKENS, max_pixels=MAX_PIXELS
        )
    )
    assert [r.token for r in responses] == out.sequences[0, ids.shape[1] :].tolist()
    for step, (response, expected) in enumerate(zip(responses, theirs, strict=True)):
        np.testing.assert_allclose(np.array(response.logprobs), expected, atol=1e-4, err_msg=step)


def test_greedy_decode_queues_the_token_and_the_logits(ours, monkeypatch):
    """Each greedy step queues its token and the pass's logits, not the log-probabilities: the
    vocabulary's log-sum-exp waits until someone reads them (the test above reads them)."""
    model, processor = ours
    queued = []
    original = mx.async_eval

    def spy(*arrays):
        queued.append(arrays)
        return original(*arrays)

    monkeypatch.setattr(mx, "async_eval", spy)
    result = generate(model, processor, "Tell me a story.", max_tokens=6)
    assert len(result.tokens) == 6 and len(queued) == 6
    for token, logits in queued:
        assert token.shape == (1,) and logits.shape == (1, model.config.text.vocab_size)
        assert token.item() == np.argmax(np.array(logits))
        assert abs(mx.logsumexp(logits).item()) > 0.1  # raw scores, not normalized ones


@pytest.mark.parametrize("step_size", [512, 7])
def test_the_first_token_takes_one_pass_per_prefill_chunk(ours, monkeypatch, step_size):
    """The prompt's last token rides with the last chunk (its logits alone): ceil(L / step)
    passes before the first token, not one more for the last token."""
    from mimo_mlx.generation.loop import generate_step

    model, processor = ours
    ids = processor.prepare("Tell me a story about the sea.").input_ids
    passes = []
    original = type(model).__call__

    def counting(self, *args, **kwargs):
        passes.append(kwargs.get("logits_to_keep", 0))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "__call__", counting)
    steps = generate_step(ids, model, max_tokens=1, prefill_step_size=step_size)
    first = next(steps)[0]
    chunks = -(-ids.shape[1] // step_size)
    assert passes == [0] * (chunks - 1) + [1]
    monkeypatch.undo()
    assert first == int(np.argmax(np.array(model(ids))[0, -1]))


def test_length_limit_and_stats(ours):
    model, processor = ours
    responses = list(stream_generate(model, processor, "Hi", max_tokens=7))
    assert len(responses) <= 7
    last = responses[-1]
    assert last.finish_reason in ("stop", "length")
    assert last.prompt_tokens == processor.prepare("Hi").input_ids.shape[1]
    assert last.time_to_first_token > 0 and last.peak_memory > 0


def test_seeded_sampling_is_repeatable(ours):
    model, processor = ours
    runs = [
        generate(model, processor, "Hi", max_tokens=12, temp=1.0, top_p=0.9, seed=5).tokens
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_prompt_longer_than_the_context(ours, monkeypatch):
    model, processor = ours
    short = dataclasses.replace(model.config.text, max_position_embeddings=16)
    monkeypatch.setattr(model, "config", dataclasses.replace(model.config, text=short))
    with pytest.raises(ContextFull, match="the model's context is 16") as caught:
        generate(model, processor, "Tell me a story about a long prompt.", max_tokens=2)
    assert caught.value.limit == 16 and caught.value.tokens > 16  # a server words it itself


def test_generation_never_reruns_the_vision_tower(ours, images, monkeypatch):
    model, processor = ours
    calls = []
    original = mimo_mlx.model.mimo_vl.encode

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(mimo_mlx.model.mimo_vl, "encode", counting)
    generate(model, processor, "Describe it.", images[:1], max_tokens=10)
    assert len(calls) == 1
    mx.clear_cache()


def test_greedy_with_repetition_penalty_matches_transformers(ours, reference):
    """The penalty covers the prompt and every generated token, as transformers' processor does."""
    model, processor = ours
    hf_model, _ = reference
    prompt = "Tell me a story."
    inputs = processor.prepare(prompt)
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=torch.tensor(inputs.input_ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            repetition_penalty=1.3,
        )
    theirs = out[0, inputs.input_ids.shape[1] :].tolist()
    result = generate(model, processor, prompt, max_tokens=NEW_TOKENS, repetition_penalty=1.3)
    assert_same_tokens(result.tokens, theirs)


def test_repetition_penalty_counts_the_cached_prompt(ours, reference):
    """A prompt that continues a cache: the penalty still covers the cached tokens (given as the
    context), as transformers penalizes a prompt it runs from scratch. The cache is filled with
    the model's own greedy favourites, which an unpenalized history would simply repeat."""
    from mimo_mlx.generation.loop import generate_step

    model, processor = ours
    hf_model, _ = reference
    start = processor.prepare("Tell me a story.").input_ids[0]
    favourites = [t for t, _ in generate_step(start[None], model, max_tokens=20)]
    suffix = processor.tokenizer.encode(" Again.")
    whole = np.array([[*start, *favourites, *suffix]])
    cache = model.make_cache()
    model(whole[:, : -len(suffix)], cache=cache)  # the cached part
    penalty = make_logits_processors(repetition_penalty=1.5)
    prompt = model.prepare_prompt(whole[:, -len(suffix) :], cache=cache)
    run = generate_step(
        prompt, model, max_tokens=NEW_TOKENS, logits_processors=penalty, prompt_cache=cache,
        context=whole[0],
    )  # fmt: skip
    ours_tokens = [t for t, _ in run]
    theirs = hf_generate(hf_model, {"input_ids": torch.tensor(whole)}, repetition_penalty=1.5)
    assert_same_tokens(ours_tokens, theirs)
