"""bfloat16, the dtype MiMo-VL ships and a GPU computes in, as a tested path.

Held-out tiny models (seeds no other test uses) with bfloat16 weights, as real checkpoints have, run
in float32 (the reference) and in bfloat16. The stated bound, relative to the largest |logit| of the
prompt (bfloat16 rounds relative to magnitude): bfloat16 logits within BOUND of transformers'
float32 logits at every position (mean within MEAN_BOUND), and no further from them than
transformers' own bfloat16 run (measured on the random models: 1.5-2% max and ~0.2% mean for both).
Greedy text: bfloat16 equals float32 token for token, every decode step's log-probabilities within
twice the bound (the logits' error plus the logsumexp's); if the two texts ever part, it is at a
step where float32's top two tokens were closer than that, the only place a bounded error can flip
an argmax (random tiny models have near-ties, as real models sometimes do).
"""

from __future__ import annotations

import copy

import mlx.core as mx
import numpy as np
import pytest
import torch
from tiny_models import (
    TOKENS,
    build_ids,
    hf_logits,
    mlx_logits,
    pixels,
    save_checkpoint,
    tiny_hf_model,
)

from mimo_mlx import load_model
from mimo_mlx.generation.loop import generate_step

BOUND = 0.04  # of the largest |logit|
MEAN_BOUND = 0.005
SEEDS = (41, 42, 43)
GENERATED = 24

IMAGES = np.array([[1, 10, 18], [1, 4, 6]])
VIDEO = np.array([[2, 6, 8]])


def parity_prompts(rng) -> dict:
    """The parity suite's prompts: (ids, vision inputs)."""
    image, video = pixels(IMAGES, rng), pixels(VIDEO, rng)
    two_images = [
        ("text", 5),
        ("image", (1, 10, 18)),
        ("text", 3),
        ("image", (1, 4, 6)),
        ("text", 4),
    ]
    return {
        "text": (build_ids([("text", 17)], rng), {}),
        "two images": (
            build_ids(two_images, rng),
            dict(pixel_values=image, image_grid_thw=IMAGES),
        ),
        "video": (
            build_ids([("text", 4), ("video", (2, 6, 8)), ("text", 6)], rng),
            dict(pixel_values_videos=video, video_grid_thw=VIDEO, second_per_grid_ts=[1.0]),
        ),
        "long text, then an image": (
            build_ids([("text", 700), ("image", (1, 4, 6)), ("text", 5)], rng),
            dict(pixel_values=image[-24:], image_grid_thw=IMAGES[1:]),
        ),
    }


def bf16_checkpoint(seed: int, decisive: bool = False):
    """A tiny model whose weights are exactly representable in bfloat16.

    decisive: the head is tied to a permutation of the embeddings and the layers' residual
    writes are halved, so most greedy choices are clear, as a trained model's are (the image
    still changes the text).
    """
    model = tiny_hf_model(seed=seed)
    with torch.no_grad():
        if decisive:
            embed = model.model.language_model.embed_tokens.weight
            order = torch.randperm(embed.shape[0], generator=torch.Generator().manual_seed(seed))
            model.lm_head.weight.copy_(8 * embed[order] / embed[order].norm(dim=1, keepdim=True))
            for name, param in model.model.language_model.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    param.mul_(0.5)
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16).to(torch.float32))
    return model


@pytest.fixture(scope="module", params=SEEDS)
def models(request, tmp_path_factory):
    reference = bf16_checkpoint(request.param)
    folder = save_checkpoint(reference, tmp_path_factory.mktemp(f"bf16-{request.param}"))
    ours = load_model(folder, dtype="bfloat16")
    return reference, ours, np.random.default_rng(request.param)


def transformers_bf16_logits(reference, ids, vision) -> np.ndarray:
    model = copy.deepcopy(reference).to(torch.bfloat16)
    mm = np.zeros_like(ids)
    mm[ids == TOKENS["image_token_id"]] = 1
    mm[ids == TOKENS["video_token_id"]] = 2
    kwargs = {}
    for key, value in vision.items():
        tensor = torch.tensor(np.asarray(value))
        kwargs[key] = tensor.to(torch.bfloat16) if key.startswith("pixel") else tensor
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), mm_token_type_ids=torch.tensor(mm), **kwargs)
    return out.logits.float().numpy()


def test_bfloat16_logits_stay_within_the_bound(models):
    reference, ours, rng = models
    assert ours.model.layers[0].self_attn.q_proj.weight.dtype == mx.bfloat16
    for name, (ids, vision) in parity_prompts(rng).items():
        theirs = hf_logits(reference, ids, **vision)
        scale = np.abs(theirs).max()
        diff = np.abs(np.array(mlx_logits(ours, ids, **vision).astype(mx.float32)) - theirs)
        transformers_diff = np.abs(transformers_bf16_logits(reference, ids, vision) - theirs)
        assert diff.max() < BOUND * scale, (name, diff.max() / scale)
        assert diff.mean() < MEAN_BOUND * scale, (name, diff.mean() / scale)
        assert diff.mean() < 1.5 * transformers_diff.mean(), (name, diff.mean())


def greedy(model, ids, vision, steps: int) -> list[tuple[int, np.ndarray]]:
    cache = model.make_cache()
    prompt = model.prepare_prompt(ids, **vision, cache=cache)
    run = generate_step(prompt, model, max_tokens=steps, prompt_cache=cache)
    return [(token, np.array(logprobs.astype(mx.float32))) for token, logprobs in run]


@pytest.mark.parametrize("seed", SEEDS)
def test_bfloat16_greedy_text_equals_float32(seed, tmp_path):
    folder = save_checkpoint(bf16_checkpoint(seed, decisive=True), tmp_path)
    full, half = load_model(folder, dtype="float32"), load_model(folder, dtype="bfloat16")
    decided = 0
    for name, (ids, vision) in parity_prompts(np.random.default_rng(seed)).items():
        expected, got = greedy(full, ids, vision, GENERATED), greedy(half, ids, vision, GENERATED)
        for step, ((token, logprobs), (ours, our_logprobs)) in enumerate(
            zip(expected, got, strict=True)
        ):
            # The logits' scale, recovered from log-probs: log-probs are logits minus a constant.
            bound = 2 * BOUND * np.abs(logprobs - logprobs.mean()).max()
            assert np.abs(our_logprobs - logprobs).max() < bound, (name, step)
            top_two = np.sort(logprobs)[-2:]
            if ours != token:  # a bounded error can only flip a near-tie
                assert top_two[1] - top_two[0] < bound, (name, step)
                break
            decided += 1
    # Not vacuous: most steps were compared before any near-tie (measured 67, 93 and 72 of 96).
    assert decided >= GENERATED * 4 // 2, f"only {decided} steps compared"
