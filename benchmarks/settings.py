"""What a harness run measures and how often: runtimes, scenarios, repetitions per scale and
backend, the OpenBLAS preload on a Linux CPU, and the bounds the runs are checked against. Shared by
`run`, `ranks`, `serve_load` and the report; imports none of them.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import click

from .machine import REPO
from .synthetic import checkpoint_shapes

RUNTIMES = ("mimo-mlx", "mlx-vlm", "torch")
MLX_RUNTIMES = ("mimo-mlx", "mlx-vlm")
SCENARIOS = ("vision", "generate", "multiturn", "lookup", "ranks")
OPENBLAS = "/lib/x86_64-linux-gnu/libopenblas.so.0"
CACHE = REPO / "benchmarks" / ".cache"
# Several ranks: each rank's peak memory within this much of its share of the weights.
MEMORY_SLACK = 0.15
MB = 1e6
# A vision pass's peak over the tower's weights at MiMo-VL's widths in bfloat16 (#22): image side ->
# bytes, and the 128-frame video at the default video pixels by its patch count.
IMAGE_BOUNDS = {1024: 0.6e9, 1344: 1.0e9}
VIDEO_BOUNDS = {65536: 1.5e9}

# lookup: the prompt-lookup scenario's answer length; None: twice `decode`, at least 32.
DEFAULTS = dict(
    sizes=[448, 1024, 1344], warmup=1, runs=3, image=448, text=32, decode=64, lookup=None
)
# At full scale on a CPU, a 1344x1344 encode takes minutes and the 4-bit decoder's quantized matmul
# runs single-threaded at ~2 GFLOPS (~7 s per token; see the kernel bounds): fewer repetitions, and
# generation with the smallest image (56x56, 4 image tokens) and 4 decoded tokens. Sizes from
# `large_warmup_from` on get no warm-up of their own (smaller sizes measured first in the same
# process warmed every kernel up); `size_runs` sets runs per size. On a GPU the defaults apply.
FULL_CPU = dict(
    runs=2,
    size_runs={1024: 1},
    large_warmup_from=1024,
    gen_warmup=0,
    gen_runs=1,
    image=56,
    text=8,
    decode=4,
    lookup=0,  # prompt lookup verifies up to 11 tokens a pass: minutes per pass here
)


# At full scale on a GPU (the measurement: a 1024x1024 image and 32 text tokens, 1,403
# prompt tokens, 128 tokens decoded, medians of 3), sized to finish within 7 minutes with the
# weights on one H200: the prompt-lookup answers are 128 tokens, not twice --decode-tokens.
FULL_GPU = dict(image=1024, decode=128, lookup=128)

# Seconds each worker process may run before it is killed and recorded as timed out, by task
# ("default" for any other). The full-scale GPU limits are about twice what each took on an H200.
TIME_LIMITS = {
    "tiny": {"default": 300},
    "small": {"default": 3600},
    "full-cpu": {"default": 8 * 3600},
    "full-gpu": {
        "weights": 180,
        "kernels": 90,
        "vision": 120,
        "generate": 150,
        "multiturn": 120,
        "lookup": 180,
        "precompile": 150,
        "default": 150,
    },
}


def profile(scale: str, cpu: bool) -> str:
    """The settings profile: the scale, and at full scale the backend (full-cpu, full-gpu)."""
    return scale if scale != "full" else ("full-cpu" if cpu else "full-gpu")


def time_limit(scale: str, cpu: bool, task: str) -> float:
    limits = TIME_LIMITS[profile(scale, cpu)]
    return limits.get(task, limits["default"])


def settings(scale: str, cpu: bool, overrides: dict) -> dict:
    """The repetitions and prompt for `scale` on this backend, command-line overrides last."""
    chosen = {**DEFAULTS, "large_warmup_from": None, "size_runs": {}}
    if scale == "full":
        chosen.update(FULL_CPU if cpu else FULL_GPU)
    chosen.update({k: v for k, v in overrides.items() if v is not None})
    chosen.setdefault("gen_warmup", chosen["warmup"])
    chosen.setdefault("gen_runs", chosen["runs"])
    if overrides.get("warmup") is not None:
        chosen["gen_warmup"] = overrides["warmup"]
    if overrides.get("runs") is not None:
        chosen["gen_runs"], chosen["size_runs"] = overrides["runs"], {}
    if chosen["lookup"] is None:
        chosen["lookup"] = max(32, 2 * chosen["decode"])
    return chosen


def size_plans(settings: dict) -> list[dict]:
    """Warm-up and timed runs per vision size, as the harness ran them."""
    cutoff, per_size = settings.get("large_warmup_from"), settings.get("size_runs", {})
    return [
        {
            "size": size,
            "warmup": 0 if cutoff and size >= cutoff else settings["warmup"],
            "runs": int(per_size.get(size, per_size.get(str(size), settings["runs"]))),
        }
        for size in sorted(settings["sizes"])
    ]


def model_parameters(config: dict) -> int:
    return sum(math.prod(s) for s in checkpoint_shapes(config).values())


def precompile_together(config: dict, jobs: int, memory_bytes: int) -> int:
    """How many precompile workers may run at once in `memory_bytes` of device memory: each may
    hold the bfloat16 weights and, while it makes a 4-bit variant in memory, half as much again."""
    need = model_parameters(config) * 2 * 1.5
    return max(1, min(jobs, int(0.8 * memory_bytes // max(need, 1))))


def model_fits(config: dict, ram_bytes: int, bytes_per_param: int) -> tuple[bool, float]:
    """Whether the whole model in this dtype fits in 80% of RAM (with room for activations)."""
    need = model_parameters(config) * bytes_per_param
    return need < 0.8 * ram_bytes, need / 1e9


def openblas_warning(cpu: bool, openblas: bool | None) -> str | None:
    """On a Linux CPU without the system OpenBLAS, what that costs and how to install it."""
    if (
        not (cpu and sys.platform.startswith("linux"))
        or openblas is False
        or Path(OPENBLAS).is_file()
    ):
        return None
    return (
        f"warning: the system OpenBLAS ({OPENBLAS}) is missing, so MLX uses its bundled reference "
        "BLAS, about 40x slower at float32 matmul: CPU timings will say little. Install it with "
        "`sudo apt-get install libopenblas0-pthread` (Debian/Ubuntu) and run again."
    )


def openblas_preload(openblas: bool | None, cpu: bool) -> str | None:
    """The OpenBLAS to preload into MLX processes: only on a Linux CPU, only if it exists."""
    available = cpu and sys.platform.startswith("linux") and Path(OPENBLAS).is_file()
    if openblas and not available:
        raise click.UsageError(f"--openblas needs {OPENBLAS} on a Linux CPU")
    return OPENBLAS if (openblas is None or openblas) and available else None
