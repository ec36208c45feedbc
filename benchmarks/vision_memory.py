"""Peak memory of one vision pass through MiMo-VL's full-width tower, on the schedule this backend
runs (`vision.tower_schedule`, as `Model.encode_vision` runs it).

    python -m benchmarks.vision_memory --size 1344 --out benchmarks/results/vision-memory.json
    python -m benchmarks.vision_memory --video 128 --depth 4
    python -m benchmarks.vision_memory --size 448,1024,1344 --schedule one-graph --runs 3

Random weights at the real shapes (memory does not depend on their values), float32 on the CPU,
bfloat16 on a GPU. `--video FRAMES` encodes a video of FRAMES frames at the default video pixels
(448x448: 1,024 patches a pair of frames; 128 frames are 65,536 patches). `--depth` runs fewer
blocks (every 4th attending within frames, as in MiMo-VL): a pass is evaluated block by block (or
in pieces of blocks), so its peak does not grow with depth, and a few blocks measure it sooner.
Peak over the weights counts the pixels. The bounds it checks are MiMo-VL's in bfloat16 (#22):
1.0 GB above the weights at 1344x1344, 0.6 GB at 1024x1024, 1.5 GB for the 128-frame video; a
float32 run holds twice the bytes of a bfloat16 one. `--schedule one-graph` runs the pass as one
lazy graph instead (what every backend ran before #22), for a before-and-after on the same
machine; `--runs N` times N passes after one warm-up pass (a GPU compiles its kernels in the
first) and reports their median and the largest peak.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import click
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mimo_mlx.model.backend import VisionSchedule, device_kind
from mimo_mlx.model.config import VisionConfig
from mimo_mlx.model.vision import VisionModel, encode, tower_schedule
from mimo_mlx.model.windows import frame_groups
from mimo_mlx.options import DEFAULT_VIDEO_MAX_PIXELS

from .machine import provenance, write_json
from .settings import IMAGE_BOUNDS, VIDEO_BOUNDS


def pass_grid(size: int | None, frames: int | None) -> np.ndarray:
    """The grid (t, h, w) of a square image of side `size` or a video of `frames` frames at the
    default video pixels, as the processor sizes them."""
    if frames is not None:
        side = int(np.sqrt(DEFAULT_VIDEO_MAX_PIXELS)) // 14  # 448x448 frames: 32 patches a side
        return np.array([[-(-frames // 2), side, side]])
    side = 2 * round(size / 28)  # patches per side after the processor's resize
    return np.array([[1, side, side]])


def full_width_tower(depth: int | None) -> tuple[VisionModel, mx.Dtype, int]:
    """MiMo-VL's tower with random weights, evaluated (`depth` blocks, every 4th attending
    within frames; default 32), in float32 on the CPU and bfloat16 on a GPU; and its weights'
    bytes."""
    config = VisionConfig()
    if depth is not None:
        config = VisionConfig(depth=depth, fullatt_block_indexes=tuple(range(3, depth, 4)))
    dtype = mx.float32 if device_kind() == "cpu" else mx.bfloat16
    tower = VisionModel(config)
    tower.set_dtype(dtype)
    mx.eval(tower.parameters())
    return tower, dtype, sum(v.nbytes for _, v in tree_flatten(tower.parameters()))


def measure(grid: np.ndarray, depth: int | None, one_graph: bool = False, runs: int = 1) -> dict:
    tower, dtype, weights = full_width_tower(depth)
    config = tower.config
    patches = int(np.prod(grid, axis=1).sum())
    pixels = mx.random.normal((patches, config.patch_dim)).astype(dtype)
    mx.eval(pixels)
    schedule = VisionSchedule() if one_graph else tower_schedule(tower, grid, device_kind())
    if runs > 1:  # one warm-up pass: kernels compiled, buffers sized
        mx.eval(encode(tower, pixels, grid, schedule))
    seconds, peak = [], 0
    for _ in range(runs):
        mx.clear_cache()
        mx.reset_peak_memory()
        start = time.perf_counter()
        mx.eval(encode(tower, pixels, grid, schedule))
        seconds.append(time.perf_counter() - start)
        peak = max(peak, mx.get_peak_memory())
    return {
        "grid_thw": grid.tolist(),
        "patches": patches,
        "depth": config.depth,
        "fullatt_block_indexes": list(config.fullatt_block_indexes),
        "device": device_kind(),
        "dtype": str(dtype),
        "schedule": dataclasses.asdict(schedule),
        "schedule_name": "one-graph" if one_graph else "backend",
        "frame_groups": len(frame_groups(grid, schedule.group_patches or patches)),
        "vision_weight_bytes": weights,
        "pixel_bytes": pixels.nbytes,
        "peak_bytes": peak,
        "above_weights_bytes": peak - weights,
        "runs": runs,
        "seconds": float(np.median(seconds)),
        "runs_s": seconds,
    }


@click.command()
@click.option("--size", type=int, help="Side of the square image (default 1344).")
@click.option("--video", "frames", type=click.IntRange(min=1), help="Encode a video of FRAMES.")
@click.option("--depth", type=click.IntRange(min=1), help="Blocks (default: MiMo-VL's 32).")
@click.option(
    "--schedule",
    type=click.Choice(["backend", "one-graph"]),
    default="backend",
    show_default=True,
    help="backend: the schedule this backend runs (vision.tower_schedule); one-graph: the whole "
    "pass as one lazy graph, as before #22.",
)
@click.option(
    "--runs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Timed passes; above 1, after one warm-up pass.",
)
@click.option("--out", type=click.Path(path_type=Path), help="Write the result here as JSON.")
def main(
    size: int | None,
    frames: int | None,
    depth: int | None,
    schedule: str,
    runs: int,
    out: Path | None,
) -> None:
    """Measure one encode's peak memory through the full-width tower (random weights)."""
    if size is not None and frames is not None:
        raise click.UsageError("give --size or --video, not both")
    size = size if size is not None or frames is not None else 1344
    result = {
        **provenance("benchmarks.vision_memory"),
        "size": size,
        "video_frames": frames,
        **measure(pass_grid(size, frames), depth, schedule == "one-graph", runs),
    }
    bound = IMAGE_BOUNDS.get(size) if frames is None else VIDEO_BOUNDS.get(result["patches"])
    result["bound_bytes"] = bound
    result["bound_met"] = None if bound is None else result["above_weights_bytes"] <= bound
    write_json(result, out)


if __name__ == "__main__":
    main()
