"""A few queries on CUDA: attention through plain matmuls instead of cuDNN, which would build a
graph for every new cache length (44-70 ms a prompt-lookup verification pass on an H200). The
routing is checked for each backend, and the plain path against MLX's attention on the CPU, with
every mask the decoder passes."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mimo_mlx.model import language
from mimo_mlx.model.backend import PLAIN_ATTENTION_QUERIES, plain_attention
from mimo_mlx.model.language import attention, plain_grouped_attention


@pytest.mark.parametrize(
    "kind, dtype, queries, plain",
    [
        ("cuda", mx.bfloat16, 2, True),
        ("cuda", mx.float16, PLAIN_ATTENTION_QUERIES, True),  # the widest lookup verification
        ("cuda", mx.bfloat16, 1, False),  # a decode step: MLX's vector kernel, nothing to build
        ("cuda", mx.bfloat16, PLAIN_ATTENTION_QUERIES + 1, False),  # prefill chunks keep cuDNN
        ("cuda", mx.float32, 9, False),  # no cuDNN in float32: MLX's own unfused path already
        ("metal", mx.bfloat16, 9, False),  # Metal's kernels build nothing per shape
        ("cpu", mx.bfloat16, 9, False),
    ],
)
def test_plain_attention_only_where_cudnn_would_build_a_graph(kind, dtype, queries, plain):
    assert plain_attention(kind, dtype, 128, queries) is plain


def grouped(length: int, keys: int, dtype=mx.float32, seed: int = 0) -> tuple[mx.array, ...]:
    """Queries (1, 8, length, 64) over keys and values (1, 2, keys, 64): 4 query heads a group."""
    rng = np.random.default_rng(seed)
    shapes = ((1, 8, length, 64), (1, 2, keys, 64), (1, 2, keys, 64))
    return tuple(mx.array(rng.standard_normal(s).astype(np.float32)).astype(dtype) for s in shapes)


def masks(length: int, keys: int) -> list:
    """None, the causal rule aligned to the end of the keys, and a boolean and an additive mask
    as a batch's padding gives them, (B, 1, L, N)."""
    visible = np.random.default_rng(5).random((1, 1, length, keys)) < 0.7
    visible[..., 0] = True  # every query sees a key
    additive = np.where(visible, 0.0, -1e9).astype(np.float32)
    return [None, "causal", mx.array(visible), mx.array(additive)]


@pytest.mark.parametrize("length, keys", [(2, 2), (9, 70), (16, 300)])
def test_plain_attention_equals_mlx_attention(length, keys):
    q, k, v = grouped(length, keys)
    for mask in masks(length, keys):
        expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
        found = plain_grouped_attention(q, k, v, 0.125, mask)
        assert found.shape == expected.shape
        np.testing.assert_allclose(np.array(found), np.array(expected), atol=1e-5)


def test_the_decoder_attention_takes_the_plain_path_only_where_the_backend_says(monkeypatch):
    """On (pretended) CUDA in bfloat16 a 9-query pass goes through plain matmuls and gives MLX's
    attention within bfloat16's precision; one query, a long chunk, and other backends do not."""
    calls = []
    real = language.plain_grouped_attention
    monkeypatch.setattr(
        language, "plain_grouped_attention", lambda *a: calls.append(a[0].shape[2]) or real(*a)
    )
    for kind, length, plain in (("cuda", 9, True), ("cuda", 1, False), ("cuda", 40, False),
                                ("metal", 9, False), ("cpu", 9, False)):  # fmt: skip
        monkeypatch.setattr(language, "device_kind", lambda kind=kind: kind)
        calls.clear()
        q, k, v = grouped(length, 120, mx.bfloat16, seed=length)
        mask = "causal" if length > 1 else None
        found = attention(q, k, v, 0.125, mask)
        assert calls == ([length] if plain else []), (kind, length)
        expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
        difference = mx.abs(found.astype(mx.float32) - expected.astype(mx.float32)).max()
        assert difference.item() < 2e-2, (kind, length)


def test_a_verification_pass_gives_the_same_logits_through_the_plain_path(monkeypatch):
    """A tiny decoder (float32) prefills 40 tokens, then passes over 9 more at that cache offset,
    as a prompt-lookup verification does: the logits are the same with attention through plain
    matmuls (forced here for any dtype) as through MLX's attention."""
    from test_gpu_schedule import decoder

    model = decoder(3)
    rng = np.random.default_rng(7)
    prompt, draft = (mx.array(rng.integers(0, 400, (1, n))) for n in (40, 9))

    def verification_logits() -> np.ndarray:
        cache = model.make_cache()
        mx.eval(model(prompt, cache=cache))
        return np.array(model(draft, cache=cache))

    fused = verification_logits()
    calls = []
    monkeypatch.setattr(language, "plain_attention", lambda *a: calls.append(a) or True)
    plain = verification_logits()
    assert calls and all(a[3] in (9, 40) for a in calls)
    assert np.abs(plain - fused).max() < 1e-4
