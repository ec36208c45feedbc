"""Samplers and logits processors against transformers' logits warpers / processors."""

import mlx.core as mx
import numpy as np
import pytest

from mimo_mlx.errors import MimoError
from mimo_mlx.generation.sampling import (
    apply_repetition_penalty,
    make_logits_processors,
    make_sampler,
    make_warper,
)

torch = pytest.importorskip("torch")
logits_process = pytest.importorskip("transformers.generation.logits_process")


def _logits(batch=4, vocab=1000, seed=0, scale=3.0):
    return np.random.default_rng(seed).normal(size=(batch, vocab)).astype(np.float32) * scale


def _theirs(warpers, logits, input_ids=None):
    scores = torch.from_numpy(logits.copy())
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long) if input_ids is None else input_ids
    for warper in warpers:
        scores = warper(ids, scores)
    return scores.numpy()


def _ours(logits, **options):
    return np.array(make_warper(**options)(mx.array(logits)))


def test_greedy_is_argmax():
    logits = _logits()
    tokens = make_sampler(temp=0.0, top_p=0.5, top_k=3)(mx.array(logits))
    np.testing.assert_array_equal(np.array(tokens), logits.argmax(axis=-1))


def test_temperature_matches_transformers():
    logits = _logits()
    theirs = _theirs([logits_process.TemperatureLogitsWarper(0.7)], logits)
    np.testing.assert_array_equal(_ours(logits, temp=0.7), theirs)


@pytest.mark.parametrize("top_k", [1, 5, 50, 999, 1000, 5000])
def test_top_k_support_matches_transformers(top_k):
    logits = _logits(seed=top_k)
    theirs = _theirs([logits_process.TopKLogitsWarper(top_k)], logits)
    ours = _ours(logits, top_k=top_k)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
    np.testing.assert_array_equal(ours[np.isfinite(ours)], logits[np.isfinite(theirs)])


@pytest.mark.parametrize("top_p", [0.01, 0.3, 0.8, 0.95, 0.999])
@pytest.mark.parametrize("scale", [0.5, 3.0, 10.0])
def test_top_p_support_matches_transformers(top_p, scale):
    logits = _logits(seed=int(top_p * 1000), scale=scale)
    theirs = _theirs([logits_process.TopPLogitsWarper(top_p)], logits)
    ours = _ours(logits, top_p=top_p)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))


@pytest.mark.parametrize("min_p", [0.001, 0.05, 0.2, 0.9, 1.0])
def test_min_p_support_matches_transformers(min_p):
    logits = _logits(seed=int(min_p * 1000))
    theirs = _theirs([logits_process.MinPLogitsWarper(min_p)], logits)
    ours = _ours(logits, min_p=min_p)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))


@pytest.mark.parametrize(
    "options",
    [
        dict(temp=0.3, top_p=0.95),  # MiMo-VL's recommended setting
        dict(temp=0.7, top_k=40, top_p=0.9, min_p=0.02),
        dict(temp=1.5, top_k=200, min_p=0.1),
        dict(temp=0.5, top_p=0.5, min_p=0.3),
    ],
)
def test_chain_matches_transformers_order(options):
    # transformers' generate: temperature, top-k, top-p, min-p, in this order.
    warpers = [logits_process.TemperatureLogitsWarper(options["temp"])]
    if "top_k" in options:
        warpers.append(logits_process.TopKLogitsWarper(options["top_k"]))
    if "top_p" in options:
        warpers.append(logits_process.TopPLogitsWarper(options["top_p"]))
    if "min_p" in options:
        warpers.append(logits_process.MinPLogitsWarper(options["min_p"]))
    logits = _logits(seed=7)
    theirs = _theirs(warpers, logits)
    ours = _ours(logits, **options)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
    np.testing.assert_allclose(ours[np.isfinite(ours)], theirs[np.isfinite(theirs)], rtol=1e-6)


def test_sampling_frequencies_follow_warped_softmax():
    base = np.array([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -4.0]], dtype=np.float32)
    options = dict(temp=0.8, top_p=0.9, top_k=6)
    warped = _ours(base, **options)[0]
    expected = np.exp(warped - warped.max())
    expected /= expected.sum()
    mx.random.seed(0)
    draws = 40_000  # one vectorized call: a batch of identical rows
    tokens = np.array(make_sampler(**options)(mx.array(np.repeat(base, draws, axis=0))))
    freq = np.bincount(tokens, minlength=base.shape[1]) / draws
    assert np.all(freq[expected == 0] == 0)  # masked tokens are never drawn
    np.testing.assert_allclose(freq, expected, atol=0.01)


def test_seeded_sampling_is_reproducible():
    logits = mx.array(_logits())
    sampler = make_sampler(temp=1.0)
    mx.random.seed(42)
    first = np.array(sampler(logits))
    mx.random.seed(42)
    np.testing.assert_array_equal(np.array(sampler(logits)), first)


def test_a_seeded_sampler_keeps_its_own_random_state():
    """make_sampler(seed=s) draws what the global state draws after mx.random.seed(s), however
    its draws interleave with another sampler's (as rows of one batch do)."""
    logits = mx.array(np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32))
    expected = {}
    for seed in (3, 4):
        mx.random.seed(seed)
        alone = make_sampler(temp=0.9, top_p=0.95)
        expected[seed] = [alone(logits).item() for _ in range(20)]
    mine, theirs = make_sampler(temp=0.9, top_p=0.95, seed=3), make_sampler(0.9, 0.95, seed=4)
    drawn = {3: [], 4: []}
    for _ in range(20):
        drawn[3].append(mine(logits).item())
        drawn[4].append(theirs(logits).item())
        mx.random.categorical(logits)  # the global state moves on: the seeded ones do not care
    assert drawn == expected and drawn[3] != drawn[4]


def test_half_precision_logits_are_upcast():
    logits = _logits()
    ours = np.array(make_warper(temp=0.5, top_k=10)(mx.array(logits).astype(mx.bfloat16)))
    assert ours.dtype == np.float32 and np.isfinite(ours).sum() == 4 * 10


def _penalty_ids(batch, vocab, length, seed):
    ids = np.random.default_rng(seed).integers(0, vocab, size=(batch, length))
    ids[:, :3] = ids[:, 3:6]  # duplicates are penalized once
    ids[0, -1] = (
        vocab + 5
    )  # ids beyond the logits' width (tokenizer larger than lm_head) are ignored
    return ids


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty):
    logits = _logits(vocab=300)
    ids = _penalty_ids(4, 300, 40, seed=1)
    theirs = _theirs(
        [logits_process.RepetitionPenaltyLogitsProcessor(penalty)], logits, torch.from_numpy(ids)
    )
    ours = apply_repetition_penalty(mx.array(logits), mx.array(ids), penalty)
    np.testing.assert_array_equal(np.array(ours), theirs)


def test_repetition_processor_window_and_shared_history():
    logits = _logits(batch=2, vocab=300)
    ids = _penalty_ids(1, 300, 30, seed=2)[0] % 300
    processor = make_logits_processors(repetition_penalty=1.2, context_size=10)[0]
    ours = np.array(processor(mx.array(ids), mx.array(logits)))  # (L,) history shared by both rows
    theirs = _theirs(
        [logits_process.RepetitionPenaltyLogitsProcessor(1.2)],
        logits,
        torch.from_numpy(np.tile(ids[-10:], (2, 1))),
    )
    np.testing.assert_array_equal(ours, theirs)


def test_no_processors_when_disabled():
    assert make_logits_processors() == []
    assert make_logits_processors(repetition_penalty=1.0) == []
    logits = mx.array(_logits())
    assert apply_repetition_penalty(logits, mx.array([], dtype=mx.int32), 1.5) is logits


@pytest.mark.parametrize(
    "options",
    [
        dict(temp=-1.0),
        dict(temp=float("inf")),
        dict(temp=float("nan")),
        dict(temp=0.5, top_p=-0.1),
        dict(temp=0.5, top_p=1.5),
        dict(temp=0.5, top_k=-1),
        dict(temp=0.5, min_p=2.0),
        dict(temp=0.5, min_tokens_to_keep=0),
    ],
)
def test_bad_options(options):
    with pytest.raises(MimoError):
        make_sampler(**options)


@pytest.mark.parametrize("top_p", [0.0, 1.0])
def test_top_p_zero_or_one_disables_it_as_in_mlx_lm(top_p):
    logits = _logits()
    np.testing.assert_array_equal(_ours(logits, top_p=top_p), logits)


@pytest.mark.parametrize("keep", [1, 3, 40])
def test_min_tokens_to_keep_matches_transformers(keep):
    logits = _logits(seed=keep, scale=6.0)
    theirs = _theirs([logits_process.MinPLogitsWarper(0.5, min_tokens_to_keep=keep)], logits)
    ours = _ours(logits, min_p=0.5, min_tokens_to_keep=keep)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))


def test_bad_penalty():
    with pytest.raises(MimoError, match="repetition_penalty"):
        make_logits_processors(repetition_penalty=0.0)
