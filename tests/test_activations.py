"""The fused SwiGLU against torch's silu, where rounding and overflow are hardest."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from mimo_mlx.model.activations import swiglu


def _reference(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    g, u = torch.from_numpy(gate).double(), torch.from_numpy(up).double()
    return (torch.nn.functional.silu(g) * u).numpy()


def test_swiglu_matches_torch_silu_in_float32_over_the_whole_range():
    rng = np.random.default_rng(0)
    gate = np.concatenate(
        [rng.normal(0, 4, 4096), [-1e4, -200.0, -89.0, -88.7, -20.0, 0.0, 20.0, 89.0, 1e4]]
    ).astype(np.float32)
    up = rng.normal(0, 2, gate.shape).astype(np.float32)
    out = swiglu(mx.array(gate), mx.array(up))
    assert out.dtype == mx.float32
    got, want = np.array(out), _reference(gate, up)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_swiglu_returns_half_precision_within_one_rounding(dtype):
    rng = np.random.default_rng(1)
    gate = mx.array(rng.normal(0, 3, 2048).astype(np.float32)).astype(dtype)
    up = mx.array(rng.normal(0, 2, 2048).astype(np.float32)).astype(dtype)
    out = swiglu(gate, up)
    assert out.dtype == dtype
    # Within one rounding of the exact result of the same half-precision inputs.
    exact = _reference(np.array(gate.astype(mx.float32)), np.array(up.astype(mx.float32)))
    want = np.array(mx.array(exact.astype(np.float32)).astype(dtype).astype(mx.float32))
    got = np.array(out.astype(mx.float32))
    np.testing.assert_allclose(got, want, rtol=2**-7 if dtype == mx.bfloat16 else 2**-10)
