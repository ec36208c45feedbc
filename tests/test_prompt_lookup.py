"""Prompt-lookup decoding gives exactly what plain decoding gives, faster where the answer copies.

Greedy: the same tokens and log-probabilities as `generate_step`, and the same cache afterwards, on
the parity suite's prompts (text, two images, a video, long text then an image), on a 400-token
answer, with a repetition penalty, and with drafting forced on at every step so that rejected,
partly and wholly accepted drafts are all verified (the default policy drafts only where the
lookup has been right). Sampling: a chi-square test of the first two tokens against the exact
warped distribution (see `test_sampled_tokens_follow_the_warped_distribution`).

Draft lengths follow the pass cost measured on the device (`generation.pass_cost`); these tests
give a flat cost (every pass as cheap as one step), so what they check never depends on timings;
test_pass_cost.py checks the sizing and the measurement.

Copying is measured on `benchmarks.lookup.follow_chain` models: a tiny random model whose greedy
choice after each token is a fixed successor, so a prompt holding the successor chain is copied.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from test_bfloat16 import parity_prompts
from tiny_models import TOKENS, save_checkpoint, tiny_hf_model

from benchmarks.lookup import chain, follow_chain, text_limit
from mimo_mlx import MimoError, load_model
from mimo_mlx.generation.lookup import MISS_LIMIT, NgramIndex, PromptLookup, accepted_count
from mimo_mlx.generation.loop import generate_step, lookup_generate_step
from mimo_mlx.generation.pass_cost import PassCost
from mimo_mlx.generation.sampling import (
    apply_repetition_penalty,
    make_logits_processors,
    make_sampler,
    make_warper,
)

IMAGE = TOKENS["image_token_id"]
FLAT = PassCost.flat(11)  # drafts as long as the options allow, whatever the machine's load


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    return load_model(save_checkpoint(tiny_hf_model(seed=51), tmp_path_factory.mktemp("pl-rand")))


@pytest.fixture(scope="module")
def chain_model(tmp_path_factory):
    model = load_model(save_checkpoint(tiny_hf_model(seed=52), tmp_path_factory.mktemp("pl-chain")))
    return model, follow_chain(model, seed=52)


def plain(model, ids, vision=None, tokens=32, **kwargs):
    """generate_step's (tokens, log-probs) and the cache it leaves."""
    cache = model.make_cache()
    prompt = model.prepare_prompt(ids, **(vision or {}), cache=cache)
    out = list(generate_step(prompt, model, max_tokens=tokens, prompt_cache=cache, **kwargs))
    return [t for t, _ in out], [np.array(lp) for _, lp in out], cache


def looked_up(model, ids, vision=None, tokens=32, lookup=None, **kwargs):
    """lookup_generate_step's (tokens, log-probs, from_draft flags), the cache and the lookup."""
    lookup = lookup or PromptLookup(cost=FLAT)
    cache = model.make_cache()
    prompt = model.prepare_prompt(ids, **(vision or {}), cache=cache)
    steps = lookup_generate_step(
        prompt, model, lookup=lookup, max_tokens=tokens, prompt_cache=cache, **kwargs
    )
    out = list(steps)
    tokens_, logprobs = [t for t, _, _ in out], [np.array(lp) for _, lp, _ in out]
    return tokens_, logprobs, [d for _, _, d in out], cache, lookup


def forced() -> PromptLookup:
    """A lookup that verifies a draft at every step where one is found (no backoff)."""
    lookup = PromptLookup(cost=FLAT)
    lookup.drafting = True
    return lookup


def assert_same_cache(ours, theirs) -> None:
    assert ours.offset == theirs.offset
    for (k1, v1), (k2, v2) in zip(ours.state, theirs.state, strict=True):
        np.testing.assert_allclose(np.array(k1), np.array(k2), atol=1e-5)
        np.testing.assert_allclose(np.array(v1), np.array(v2), atol=1e-5)
    np.testing.assert_array_equal(ours.next_positions(1), theirs.next_positions(1))


def copy_prompt(model, successor, answer: int, before=0, seed=0, image=(1, 4, 6)):
    """(ids, vision, chain): random text, an image, the chain the answer follows, random text, and
    the token before the chain; `before` tokens of the chain are left out of the prompt."""
    rng = np.random.default_rng(seed)
    limit = text_limit(model.config)
    start = int(rng.integers(0, limit))
    links = chain(successor, successor[start], answer + 8)
    ids = [
        *rng.integers(0, limit, 5).tolist(),
        TOKENS["vision_start_token_id"],
        *[IMAGE] * (int(np.prod(image)) // 4),
        TOKENS["vision_end_token_id"],
        *links[before:],
        *rng.integers(0, limit, 5).tolist(),
        start,
    ]
    vision = dict(
        pixel_values=rng.standard_normal((int(np.prod(image)), 1176)).astype(np.float32),
        image_grid_thw=np.array([image]),
    )
    return np.array([ids]), vision, links


# ------------------------------------------------------------------ drafting, pure host logic


def test_index_copies_what_followed_the_last_ngram():
    index = NgramIndex(max_ngram=2)
    index.extend([5, 6, 7, 8, 9, 1, 6, 7])
    assert index.propose(3) == ([8, 9, 1], 3)  # (6, 7) was followed by 8 9 1
    assert index.propose(10) == ([8, 9, 1, 6, 7], 3)  # up to the end of what was seen
    assert index.propose(0) == ([], -1)
    index.append(4)  # (7, 4) and (4,) never seen before
    assert index.propose(3) == ([], -1)


def test_index_prefers_longer_ngrams_and_the_copy_in_progress():
    index = NgramIndex(max_ngram=2)
    index.extend([1, 2, 3, 9, 2, 4, 1, 2])
    assert index.propose(1) == ([3], 2)  # the bigram (1, 2) beats the later unigram (2,)
    index.cursor = 3  # a copy went on past position 3: the next occurrence after it wins
    index.append(7)
    assert index.propose(2) == ([], -1)
    index = NgramIndex(max_ngram=1)
    index.extend([4, 1, 4, 2, 4, 3, 4])
    assert index.propose(1) == ([1], 1)  # a fresh index takes the earliest, as transformers
    index.cursor = 4
    assert index.propose(1) == ([3], 5)
    index.cursor = 100
    assert index.propose(1) == ([3], 5)  # none after the cursor: the one just before it


def test_index_never_drafts_or_matches_placeholders():
    index = NgramIndex(max_ngram=2, blocked={IMAGE})
    index.extend([3, 4, IMAGE, IMAGE, 5, 3, 4, 6, 3])
    assert index.propose(5) == ([4, IMAGE][:1], 1)  # cut before the image
    index = NgramIndex(max_ngram=2, blocked={IMAGE})
    index.extend([8, IMAGE, 9, 8])
    assert index.propose(3) == ([], -1)  # 8 was only followed by a placeholder
    index.append(IMAGE)
    assert index.propose(3) == ([], -1)  # a tail ending in a placeholder matches nothing


def test_accepted_count():
    assert accepted_count([4, 5, 6], [4, 5, 6, 7]) == 3
    assert accepted_count([4, 5, 6], [4, 9, 6, 7]) == 1
    assert accepted_count([4, 5, 6], [1, 5, 6, 7]) == 0


def test_options_are_checked():
    with pytest.raises(MimoError, match="prompt_lookup_num_tokens must be an integer >= 1"):
        PromptLookup(num_tokens=0)
    with pytest.raises(MimoError, match="max_matching_ngram_size must be an integer >= 1"):
        PromptLookup(ngram_size=0)
    with pytest.raises(MimoError, match="max_matching_ngram_size must be at most 16"):
        PromptLookup(ngram_size=17)


# ------------------------------------------------------------------ greedy: token for token


@pytest.mark.parametrize("policy", ["default", "forced"])
def test_greedy_is_identical_on_the_parity_prompts(random_model, policy):
    drafted = 0
    for name, (ids, vision) in parity_prompts(np.random.default_rng(5)).items():
        tokens, logprobs, cache = plain(random_model, ids, vision, tokens=48)
        lookup = forced() if policy == "forced" else None
        ours, our_logprobs, _, our_cache, used = looked_up(
            random_model, ids, vision, tokens=48, lookup=lookup
        )
        assert ours == tokens, name
        for step, (a, b) in enumerate(zip(our_logprobs, logprobs, strict=True)):
            np.testing.assert_allclose(a, b, atol=1e-4, err_msg=f"{name} step {step}")
        assert_same_cache(our_cache, cache)
        drafted += used.drafted
    if policy == "forced":  # not vacuous: drafts were verified (and most rejected) on the way
        assert drafted > 50


def test_greedy_copy_is_identical_and_takes_fewer_passes(chain_model):
    model, successor = chain_model
    ids, vision, links = copy_prompt(model, successor, answer=400)
    tokens, logprobs, cache = plain(model, ids, vision, tokens=400)
    assert tokens == links[:400]  # the model copies the prompt's chain
    ours, our_logprobs, from_draft, our_cache, lookup = looked_up(model, ids, vision, tokens=400)
    assert ours == tokens
    np.testing.assert_allclose(np.stack(our_logprobs), np.stack(logprobs), atol=1e-4)
    assert_same_cache(our_cache, cache)
    assert sum(from_draft) == lookup.accepted > 300
    assert lookup.passes < 400 / 5  # at least 5 tokens per forward pass
    assert not any(from_draft[:3])  # the first tokens watch before drafting


def test_greedy_with_forced_drafts_and_a_repetition_penalty(chain_model, random_model):
    """Each verified position's processors see the tokens up to it: the same tokens as plain."""
    model, successor = chain_model
    ids, vision, _ = copy_prompt(model, successor, answer=64)
    text = np.random.default_rng(1).integers(0, 30, (1, 40))  # short ids: drafts everywhere
    for m, prompt in ((model, (ids, vision)), (random_model, (text, None))):
        processors = make_logits_processors(1.3)
        tokens, logprobs, _ = plain(m, *prompt, tokens=64, logits_processors=processors)
        ours, our_logprobs, _, _, lookup = looked_up(
            m, *prompt, tokens=64, lookup=forced(), logits_processors=processors
        )
        assert ours == tokens and lookup.drafted > 0
        np.testing.assert_allclose(np.stack(our_logprobs), np.stack(logprobs), atol=1e-4)


def test_a_long_prompt_in_chunks_and_a_second_turn(chain_model):
    """Prefill in chunks, then lookup continuing a cache (context: the whole conversation)."""
    model, successor = chain_model
    ids, vision, links = copy_prompt(model, successor, answer=100, seed=3)
    tokens, _, cache = plain(model, ids, vision, tokens=100, prefill_step_size=7)
    lookup = PromptLookup(cost=FLAT)
    ours, _, _, our_cache, _ = looked_up(
        model, ids, vision, tokens=100, lookup=lookup, prefill_step_size=7
    )
    assert ours == tokens
    turn = np.array([[7, 8, 9, links[0]]])  # text quoting the chain again
    context = np.concatenate([ids[0], tokens, turn[0]])
    expected = [t for t, _ in generate_step(turn, model, max_tokens=60, prompt_cache=cache)]
    second = PromptLookup(cost=FLAT)
    steps = lookup_generate_step(
        turn, model, lookup=second, context=context, max_tokens=60, prompt_cache=our_cache
    )
    assert [t for t, _, _ in steps] == expected
    assert second.accepted > 30
    assert_same_cache(our_cache, cache)


# ------------------------------------------------------------------ budget, early stop, backoff


@pytest.mark.parametrize("tokens", [1, 2, 3, 7, 12])
def test_max_tokens_is_exact(chain_model, tokens):
    model, successor = chain_model
    ids, vision, links = copy_prompt(model, successor, answer=20)
    ours, _, _, cache, _ = looked_up(model, ids, vision, tokens=tokens, lookup=forced())
    assert ours == links[:tokens]
    assert cache.offset == ids.shape[1] + tokens - 1  # the last token is never fed


def test_stopping_early_leaves_only_what_was_given(chain_model):
    model, successor = chain_model
    ids, vision, links = copy_prompt(model, successor, answer=60)
    cache = model.make_cache()
    prompt = model.prepare_prompt(ids, **vision, cache=cache)
    steps = lookup_generate_step(prompt, model, lookup=forced(), max_tokens=60, prompt_cache=cache)
    taken = [next(steps)[0] for _ in range(25)]  # stop inside a verified draft
    steps.close()
    assert taken == links[:25]
    kept = cache.offset - ids.shape[1]  # answer tokens the cache holds: links[:kept]
    assert 20 <= kept <= 25
    rest = generate_step(np.array([[links[kept]]]), model, max_tokens=5, prompt_cache=cache)
    assert [t for t, _ in rest] == links[kept + 1 : kept + 6]  # it goes on from there


def test_drafting_stops_when_drafts_fail_and_resumes_when_copying_starts(chain_model):
    model, successor = chain_model
    # Every answer token is in the prompt, never followed by its successor: lookups always fail.
    ids, vision, links = copy_prompt(model, successor, answer=80)
    first = 5 + 2 + 6  # random text, the image's start, end and its 6 placeholders
    shuffled = ids.copy()
    shuffled[0, first : first + 88] = np.random.default_rng(0).permutation(links)
    tokens, _, _ = plain(model, shuffled, vision, tokens=80)
    ours, _, _, _, lookup = looked_up(model, shuffled, vision, tokens=80)
    assert ours == tokens and lookup.verifications == 0 and lookup.passes == 80
    ours, _, _, _, lookup = looked_up(model, shuffled, vision, tokens=80, lookup=forced())
    assert ours == tokens
    assert lookup.verifications == MISS_LIMIT and lookup.accepted == 0  # then it backed off
    # The chain from its 30th link on is in the prompt: drafting begins once the answer gets there.
    ids, vision, links = copy_prompt(model, successor, answer=120, before=30)
    tokens, _, _ = plain(model, ids, vision, tokens=120)
    ours, _, from_draft, _, lookup = looked_up(model, ids, vision, tokens=120)
    assert ours == tokens
    assert not any(from_draft[:31]) and sum(from_draft) > 60


def test_one_sequence_at_a_time(random_model):
    batch = random_model.prepare_prompt(np.zeros((2, 4), np.int64))
    for steps in (generate_step, lookup_generate_step):
        with pytest.raises(MimoError, match="one sequence at a time"):
            list(steps(batch, random_model, max_tokens=2))


def test_quantized_model_on_the_cpu_warns(tmp_path):
    model = load_model(save_checkpoint(tiny_hf_model(seed=53), tmp_path))
    decoder = lambda path, module: "layers" in path and isinstance(module, nn.Linear)  # noqa: E731
    nn.quantize(model, group_size=32, bits=4, class_predicate=decoder)
    with pytest.warns(UserWarning, match="not faster"):
        list(lookup_generate_step(np.array([[1, 2, 3]]), model, max_tokens=3))


# ------------------------------------------------------------------ sampling: the same distribution


def chi_square_sf(statistic: float, df: int) -> float:
    """P(X >= statistic) for X ~ chi-square(df): the regularized upper incomplete gamma Q(df/2,
    statistic/2), by its power series (fine for the small df used here)."""
    a, x = df / 2, statistic / 2
    term = total = 1.0 / a
    for n in range(1, 1000):
        term *= x / (a + n)
        total += term
    return 1.0 - math.exp(-x + a * math.log(x) - math.lgamma(a)) * total


def exact_first_two(model, ids, options: dict) -> dict[tuple[int, int], float]:
    """P(first token, second token) under plain sampling: the warped distributions, computed."""
    warp = make_warper(options["temp"], top_p=options.get("top_p", 0.0), top_k=options["top_k"])
    penalty = options.get("repetition_penalty")

    def distribution(tokens: list[int]) -> np.ndarray:
        logits = model(mx.array([tokens]))[0, -1:].astype(mx.float32)
        if penalty:
            logits = apply_repetition_penalty(logits, mx.array(tokens), penalty)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return np.array(mx.softmax(warp(logprobs), axis=-1))[0]

    joint = {}
    first = distribution(ids[0].tolist())
    for x0 in np.flatnonzero(first):
        second = distribution([*ids[0].tolist(), int(x0)])
        for x1 in np.flatnonzero(second):
            joint[int(x0), int(x1)] = float(first[x0] * second[x1])
    return joint


@pytest.mark.parametrize(
    "options",
    [
        dict(temp=1.0, top_k=3),
        dict(temp=0.8, top_k=3, top_p=0.95, repetition_penalty=1.5),
    ],
)
def test_sampled_tokens_follow_the_warped_distribution(random_model, monkeypatch, options):
    """Pearson's chi-square test, seed 1234, significance 0.001: 600 two-token samples with a
    one-token draft verified at the second token (the most likely second token, so it is accepted
    and rejected often), against the exact joint distribution of plain sampling (9 cells). A
    one-token prompt keeps each sample to two forward passes."""
    ids = np.array([[17]])
    joint = exact_first_two(random_model, ids, options)
    x0 = max({k[0] for k in joint}, key=lambda t: sum(p for k, p in joint.items() if k[0] == t))
    draft = max((k for k in joint if k[0] == x0), key=joint.get)[1]
    monkeypatch.setattr(NgramIndex, "propose", lambda self, limit: ([draft][:limit], 0))
    sampler = make_sampler(options["temp"], options.get("top_p", 0.0), top_k=options["top_k"])
    processors = make_logits_processors(options.get("repetition_penalty"))
    mx.random.seed(1234)
    counts: dict[tuple[int, int], int] = {}
    accepted = samples = 0
    while samples < 600:
        lookup = forced()
        steps = lookup_generate_step(
            ids, random_model, lookup=lookup, max_tokens=3, sampler=sampler,
            logits_processors=processors,
        )  # fmt: skip
        (t0, _, _), (t1, _, from_draft) = next(steps), next(steps)
        steps.close()
        counts[t0, t1] = counts.get((t0, t1), 0) + 1
        accepted += from_draft
        samples += 1
    assert set(counts) <= set(joint)
    expected = np.array([samples * p for p in joint.values()])
    observed = np.array([counts.get(k, 0) for k in joint])
    assert expected.min() >= 5, "too few samples for the chi-square approximation"
    statistic = float(((observed - expected) ** 2 / expected).sum())
    assert chi_square_sf(statistic, len(joint) - 1) > 0.001, (statistic, observed, expected)
    # Not vacuous: the draft was verified every time, accepted and rejected many times.
    assert 50 < accepted < samples - 50
