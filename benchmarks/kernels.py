"""Kernel bounds: what MLX's own kernels on this backend allow, whatever the model code does.

Measured in a worker process, once as is and once with the system OpenBLAS preloaded (Linux), so
the JSON says how much of a figure is MLX's CPU kernels rather than mimo-mlx or mlx-vlm.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import mlx.core as mx
import numpy as np

# Scores of MiMo-VL's 4 full-attention blocks x 16 heads for a 1344x1344 image (9216 patches).
FULL_ATTENTION_EXPS = 4 * 16 * 9216**2


def _seconds(call: Callable[[], object], runs: int = 3) -> float:
    call()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _mlx(fn: Callable[[], mx.array]) -> Callable[[], None]:
    return lambda: mx.eval(fn())


def matmul_gflops(m: int, k: int, n: int) -> float:
    a, b = mx.random.normal((m, k)), mx.random.normal((k, n))
    mx.eval(a, b)
    return 2 * m * k * n / _seconds(_mlx(lambda: a @ b)) / 1e9


def quantized_matmul_gflops(m: int, k: int = 4096, n: int = 4096, bits: int = 4) -> float:
    w = mx.random.normal((n, k))
    packed, scales, biases = mx.quantize(w, 64, bits)
    x = mx.random.normal((m, k))
    mx.eval(packed, scales, biases, x)

    def call() -> mx.array:
        return mx.quantized_matmul(
            x, packed, scales, biases, transpose=True, group_size=64, bits=bits
        )

    return 2 * m * k * n / _seconds(_mlx(call)) / 1e9


def copy_bandwidth(nbytes: int) -> dict:
    """Bytes per second a copy of `nbytes` moves (read plus written): the memory bandwidth a
    memory-bound decode step is measured against (`report.bandwidth`). On a GPU, MLX's own
    elementwise copy; on the CPU, where MLX's elementwise kernels run scalar on one core, the
    faster of it and numpy's copy (also one core: a threaded BLAS can read faster still)."""
    x = mx.ones((nbytes // 4,), mx.float32)
    mx.eval(x)
    found = {"bytes": x.nbytes, "mlx_s": _seconds(_mlx(lambda: x + 0.0), runs=5)}
    seconds = found["mlx_s"]
    if mx.default_device() == mx.cpu:
        source = np.ones(nbytes // 4, np.float32)
        target = np.empty_like(source)
        found["numpy_s"] = _seconds(lambda: np.copyto(target, source), runs=5)
        seconds = min(seconds, found["numpy_s"])
    return {**found, "seconds": seconds, "bytes_per_s": 2 * x.nbytes / seconds}


def elementwise_rates(elements: int = 1 << 24) -> dict:
    """Elements per second: MLX exp (plain and mx.compile'd), add, softmax rows; numpy exp."""
    x = mx.random.normal((elements // 9216, 9216))
    mx.eval(x)
    host = np.random.default_rng(0).standard_normal(x.shape, dtype=np.float32)
    result = np.empty_like(host)  # preallocated: fresh pages per call would time page faults
    compiled_exp = mx.compile(mx.exp)
    count = x.size
    return {
        "mlx_exp": count / _seconds(_mlx(lambda: mx.exp(x))),
        "mlx_exp_compiled": count / _seconds(_mlx(lambda: compiled_exp(x))),
        "mlx_add": count / _seconds(_mlx(lambda: x + 1.0)),
        "mlx_softmax": count / _seconds(_mlx(lambda: mx.softmax(x, axis=-1))),
        "mlx_softmax_precise": count / _seconds(_mlx(lambda: mx.softmax(x, axis=-1, precise=True))),
        "numpy_exp": count / _seconds(lambda: np.exp(host, out=result)),
        "elements": count,
    }


def kernel_bounds(quick: bool = False) -> dict:
    """Matmul and quantized-matmul GFLOPS, elementwise rates, and what they imply for the ViT.

    quick (for smoke tests): smaller arrays, figures only roughly right.
    """
    vit_tokens = 128 if quick else 1024  # rows of a ViT MLP matmul; more only take longer
    side = 256 if quick else 1024
    rates = elementwise_rates(1 << 18 if quick else 1 << 24)
    result = {
        "device": str(mx.default_device()),
        "shapes": {"square": side, "vit_rows": vit_tokens, "quantized_n": side if quick else 4096},
        "matmul_gflops_f32": {
            "square_f32": matmul_gflops(side, side, side),
            "vit_mlp_x1280x3456": matmul_gflops(vit_tokens, 1280, 3456),
        },
        "quantized_matmul_gflops_4bit": {
            "m1": quantized_matmul_gflops(1, n=side if quick else 4096),
            "m64": quantized_matmul_gflops(64, n=side if quick else 4096),
        },
        "elements_per_s": rates,
        # 1 GiB on a GPU (far beyond its caches); 256 MiB on a CPU (beyond its caches, quickly)
        "copy": copy_bandwidth(
            (1 << 24) if quick else (1 << 28 if mx.default_device() == mx.cpu else 1 << 30)
        ),
    }
    result["full_attention_softmax_1344_s"] = {
        "exps": FULL_ATTENTION_EXPS,
        "at_mlx_softmax_rate": FULL_ATTENTION_EXPS / rates["mlx_softmax"],
        "at_mlx_exp_rate": FULL_ATTENTION_EXPS / rates["mlx_exp"],
        "at_numpy_exp_rate": FULL_ATTENTION_EXPS / rates["numpy_exp"],
    }
    return result
