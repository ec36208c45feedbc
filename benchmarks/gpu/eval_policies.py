"""How a vision pass evaluated as it goes spends time and memory, by evaluation policy, on this
backend: `python -m benchmarks.gpu.eval_policies --out policies.json`.

The tower's schedule (`vision.encode`) evaluates the hidden states every few half-blocks so that a
GPU backend, which keeps a command's inputs until the command has run, does not hold every
block's intermediates at once. Each evaluation the host waits for drains the device unless the
next stretch is already queued. This probe runs MiMo-VL's full-width tower (random weights) at a
few image sizes through `encode` under several schedules (`VisionSchedule`), and reports the
median time and the peak above the weights:

- one-graph: the whole pass as one lazy graph (before #22);
- backend: the schedule this backend runs (`vision.tower_schedule`);
- sync-N: `mx.eval` after every N blocks (N=1: what the GPU backends ran from #22's first step);
- lag-N: `mx.async_eval` after every N blocks, then wait for the stretch before it: the device
  runs one stretch while the host builds the next, at most two in flight;
- step-sync-N, step-lag-N: the same with a stretch of N of a block's three steps (`project`,
  `attend`, `feed_forward`), so that the stretches alive at once hold about one block;
- block: one block alone (a windowed and a full-attention one) over an evaluated input, the least
  any whole-block schedule can hold.

A policy that fails is recorded with its error and the others go on.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import click
import mlx.core as mx
import numpy as np

from mimo_mlx.model.backend import VisionSchedule, device_kind
from mimo_mlx.model.vision import VisionModel, encode, tower_schedule

from ..machine import provenance, write_json
from ..vision_memory import full_width_tower, pass_grid

# name -> (steps per evaluation, a block being three, overlapped)
POLICIES = {
    "sync-1": (3, False),
    "sync-2": (6, False),
    "sync-4": (12, False),
    "lag-1": (3, True),
    "lag-2": (6, True),
    "lag-4": (12, True),
    "step-sync-1": (1, False),
    "step-lag-1": (1, True),
    "step-lag-2": (2, True),
}


def schedules(tower: VisionModel, grid: np.ndarray) -> dict[str, VisionSchedule]:
    """Every policy's schedule for a pass of `tower` over `grid` (one group of frames)."""
    named = {"one-graph": VisionSchedule(), "backend": tower_schedule(tower, grid, device_kind())}
    for name, (steps, overlapped) in POLICIES.items():
        named[name] = VisionSchedule(steps_per_eval=steps, overlapped=overlapped)
    return named


def run_pass(tower: VisionModel, pixels: mx.array, grid: np.ndarray, schedule) -> mx.array:
    """One pass under `schedule`: its features, evaluated."""
    features = encode(tower, pixels, grid, schedule)
    mx.eval(features)
    return features


def measure(tower, pixels, grid, weights: int, runs: int, schedule: VisionSchedule) -> dict:
    run_pass(tower, pixels, grid, schedule)  # warm-up: kernels compiled, buffers sized
    seconds, peak = [], 0
    for _ in range(runs):
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        start = time.perf_counter()
        run_pass(tower, pixels, grid, schedule)
        seconds.append(time.perf_counter() - start)
        peak = max(peak, mx.get_peak_memory())
    return {
        "seconds": float(np.median(seconds)),
        "runs_s": seconds,
        "above_weights": peak - weights,
    }


def block_alone(tower, pixels, grid, weights: int, index: int) -> dict:
    """Peak of block `index` alone over its evaluated input (and the layout's tables)."""
    layout = tower.layout(grid)
    x = tower.embed(pixels, layout)
    mx.eval(x, layout.cos, layout.sin)
    plan = tower.plan(index, layout)
    mx.eval(tower.blocks[index](x, layout.cos, layout.sin, plan))  # warm-up
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    start = time.perf_counter()
    mx.eval(tower.blocks[index](x, layout.cos, layout.sin, plan))
    seconds = time.perf_counter() - start
    return {
        "block": index,
        "seconds": seconds,
        "above_input": mx.get_peak_memory() - before,
        "input_bytes": x.nbytes,
    }


@click.command()
@click.option("--sizes", default="448,1024,1344", show_default=True)
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--depth", type=click.IntRange(min=1), help="Blocks (default: MiMo-VL's 32).")
@click.option("--out", type=click.Path(path_type=Path), help="Write the results here as JSON.")
def main(sizes: str, runs: int, depth: int | None, out: Path | None) -> None:
    """Time and peak memory of one vision pass under several evaluation policies."""
    tower, dtype, weights = full_width_tower(depth)
    config = tower.config
    results = []
    for size in (int(s) for s in sizes.split(",")):
        grid = pass_grid(size, None)
        patches = int(np.prod(grid))
        pixels = mx.random.normal((patches, config.patch_dim)).astype(dtype)
        mx.eval(pixels)
        for name, schedule in schedules(tower, grid).items():
            try:
                row = measure(tower, pixels, grid, weights, runs, schedule)
            except Exception as err:  # noqa: BLE001 - a probe records any failure and goes on
                row = {"error": f"{type(err).__name__}: {err}"}
            row["schedule"] = dataclasses.asdict(schedule)
            results.append({"size": size, "patches": patches, "policy": name, **row})
            click.echo(json.dumps(results[-1]), err=True)
        for index in sorted({0, *config.fullatt_block_indexes[:1]}):
            try:
                row = block_alone(tower, pixels, grid, weights, index)
            except Exception as err:  # noqa: BLE001
                row = {"block": index, "error": f"{type(err).__name__}: {err}"}
            results.append({"size": size, "patches": patches, "policy": "block", **row})
            click.echo(json.dumps(results[-1]), err=True)
        del pixels
    report = {
        **provenance("benchmarks.gpu.eval_policies"),
        "device": device_kind(),
        "dtype": str(dtype),
        "depth": config.depth,
        "vision_weight_bytes": weights,
        "results": results,
    }
    write_json(report, out, echo=False)


if __name__ == "__main__":
    main()
