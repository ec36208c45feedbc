"""Peak memory of one vision pass through MiMo-VL's full-size tower, under mimo-mlx's schedule.

    python -m benchmarks.vision_memory --size 1344 --out benchmarks/results/vision-memory.json

Random weights at the real shapes (memory does not depend on their values), float32 on the CPU,
bfloat16 on a GPU. The bound it checks: peak <= the tower's weights + 1.5 GB.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import click
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mimo_mlx.model.backend import device_kind, vision_schedule
from mimo_mlx.model.config import VisionConfig
from mimo_mlx.model.vision import VisionModel, encode

from .machine import machine_info, versions

BOUND_BYTES = 1.5e9


def measure(size: int) -> dict:
    config = VisionConfig()
    dtype = mx.float32 if device_kind() == "cpu" else mx.bfloat16
    tower = VisionModel(config)
    tower.set_dtype(dtype)
    mx.eval(tower.parameters())
    weights = sum(v.nbytes for _, v in tree_flatten(tower.parameters()))
    side = 2 * round(size / 28)  # patches per side after the processor's resize
    grid = np.array([[1, side, side]])
    pixels = mx.random.normal((side * side, config.patch_dim)).astype(dtype)
    mx.eval(pixels)
    schedule = vision_schedule(
        device_kind(),
        dtype,
        config.head_dim,
        side * side,
        side * side,
        config.hidden_size,
        config.intermediate_size,
    )
    mx.reset_peak_memory()
    start = time.perf_counter()
    mx.eval(encode(tower, pixels, grid, schedule))
    seconds = time.perf_counter() - start
    peak = mx.get_peak_memory()
    return {
        "size": size,
        "patches": side * side,
        "device": device_kind(),
        "dtype": str(dtype),
        "schedule": dataclasses.asdict(schedule),
        "vision_weight_bytes": weights,
        "peak_bytes": peak,
        "above_weights_bytes": peak - weights,
        "bound_met": peak - weights <= BOUND_BYTES,
        "seconds": seconds,
    }


@click.command()
@click.option("--size", default=1344, show_default=True, help="Side of the square image.")
@click.option("--out", type=click.Path(path_type=Path), help="Write the result here as JSON.")
def main(size: int, out: Path | None) -> None:
    """Measure one encode's peak memory through the full-size tower (random weights)."""
    result = {
        "command": " ".join(["python -m benchmarks.vision_memory", *sys.argv[1:]]),
        "machine": machine_info(),
        "versions": versions(),
        **measure(size),
    }
    text = json.dumps(result, indent=2)
    click.echo(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


if __name__ == "__main__":
    main()
