"""One rank of the distributed tests: `python tests/distributed_worker.py SPEC.json`, under mlx.launch
(or started by hand with MLX_RANK and MLX_HOSTFILE).

Every rank loads its part of the spec's folder and runs the same work; rank 0 writes what it saw to
the spec's `out` folder, each rank writes `rank{N}.json` when it finishes cleanly. Tasks:

- "parity": logits of the parity prompts (every rank calls the model in lockstep), then greedy
  generation of the generation prompts through `Leader` / `follow`.
- "die" / "stall": a generation in which rank `victim` kills (SIGKILL) or stops (SIGSTOP) itself
  after `after` tokens, as a crashed process or a vanished host would.
- "stop": rank 0 closes one answer early and stops another with `request_stop`, then answers a
  third prompt (see `stop_early`).

The prompts are built here from the model's config (no torch import: ranks start fast), and the
tests build the same ones for the single-process reference.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from threading import Event

import mlx.core as mx
import numpy as np

from mimo_mlx.errors import MimoError
from mimo_mlx.inputs.processor import ModelInputs
from mimo_mlx.model.config import ModelConfig

AWKWARD, BELOW_MIN_PIXELS = (1, 10, 18), (1, 4, 6)


def build_ids(config: ModelConfig, parts, rng: np.random.Generator) -> np.ndarray:
    """Token ids (1, L): ("text", n) random ordinary tokens, ("image"|"video", (t, h, w))."""
    ids: list[int] = []
    below = min(config.vision_start_token_id, config.image_token_id) - 10
    merge = config.vision.spatial_merge_size**2
    for kind, value in parts:
        if kind == "text":
            ids += rng.integers(0, below, size=value).tolist()
        else:
            pad = config.image_token_id if kind == "image" else config.video_token_id
            ids += [config.vision_start_token_id, *[pad] * (int(np.prod(value)) // merge)]
            ids.append(config.vision_end_token_id)
    return np.array([ids], dtype=np.int64)


def pixels(grids, rng: np.random.Generator) -> np.ndarray:
    count = int(np.sum(np.prod(np.asarray(grids).reshape(-1, 3), axis=1)))
    return rng.standard_normal((count, 1176)).astype(np.float32)


def parity_prompts(config: ModelConfig) -> dict[str, tuple[np.ndarray, dict]]:
    """name -> (ids, vision inputs): text, two images, a video, an image and a video, a batch."""
    prompts = {}
    rng = np.random.default_rng(1)
    prompts["text"] = (build_ids(config, [("text", 17)], rng), {})
    rng = np.random.default_rng(2)
    grids = np.array([AWKWARD, BELOW_MIN_PIXELS])
    parts = [("text", 5), ("image", AWKWARD), ("text", 3), ("image", BELOW_MIN_PIXELS)]
    ids = build_ids(config, [*parts, ("text", 4)], rng)
    prompts["two_images"] = (ids, dict(pixel_values=pixels(grids, rng), image_grid_thw=grids))
    rng = np.random.default_rng(3)
    grid = np.array([[2, 6, 8]])
    ids = build_ids(config, [("text", 4), ("video", (2, 6, 8)), ("text", 6)], rng)
    vision = dict(pixel_values_videos=pixels(grid, rng), video_grid_thw=grid)
    prompts["video"] = (ids, {**vision, "second_per_grid_ts": [1.0]})
    rng = np.random.default_rng(4)
    image, video = np.array([BELOW_MIN_PIXELS]), np.array([[2, 4, 4]])
    parts = [("text", 3), ("image", BELOW_MIN_PIXELS), ("video", (2, 4, 4)), ("text", 5)]
    ids = build_ids(config, parts, rng)
    vision = dict(pixel_values=pixels(image, rng), image_grid_thw=image)
    vision.update(pixel_values_videos=pixels(video, rng), video_grid_thw=video)
    prompts["image_and_video"] = (ids, {**vision, "second_per_grid_ts": [0.5]})
    rng = np.random.default_rng(5)
    first = build_ids(config, [("text", 4), ("image", (1, 4, 6)), ("text", 3)], rng)
    second = build_ids(config, [("text", 4), ("image", (1, 6, 4)), ("text", 3)], rng)
    grids = np.array([[1, 4, 6], [1, 6, 4]])
    vision = dict(pixel_values=pixels(grids, rng), image_grid_thw=grids)
    prompts["batch"] = (np.concatenate([first, second]), vision)
    return prompts


def generation_prompts(config: ModelConfig) -> dict[str, ModelInputs]:
    """The parity prompts of one row, as model inputs for `stream_generate`."""
    return {
        name: ModelInputs(input_ids=ids, **vision)
        for name, (ids, vision) in parity_prompts(config).items()
        if ids.shape[0] == 1
    }


def logits(model, ids: np.ndarray, vision: dict) -> np.ndarray:
    prompt = model.prepare_prompt(ids, **vision)
    return np.array(model(**prompt.chunk()))


def main(spec_path: str) -> None:
    from mimo_mlx.distributed.group import start_group
    from mimo_mlx.distributed.loading import load_sharded

    mx.set_default_device(mx.cpu)
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    group = start_group(timeout=spec.get("timeout", 60.0))
    model, processor = load_sharded(spec["folder"], group)
    found = {"rank": group.rank, "size": group.size}
    if spec["task"] == "parity":
        with group.errors():
            results = {
                name: logits(model, ids, vision)
                for name, (ids, vision) in parity_prompts(model.config).items()
            }
        found["tokens"] = generate(model, processor, group, spec)
        if group.rank == 0:
            np.savez(out / "logits.npz", **results)
    else:
        found["tokens"] = generate(model, processor, group, spec)
    (out / f"rank{group.rank}.json").write_text(json.dumps(found))


def generate(model, processor, group, spec) -> dict[str, list[int]] | None:
    """Greedy answers to the generation prompts (rank 0), or following them (the others)."""
    from mimo_mlx.distributed.lockstep import Leader, follow, receive_request, run_request

    prompts = generation_prompts(model.config)
    if spec["task"] == "stop" and group.rank == 0:
        return stop_early(model, processor, group, prompts)
    if spec["task"] != "parity":
        prompts = {"text": prompts["text"]}
    if group.rank == 0:
        with Leader(model, processor, group) as leader:
            return {
                name: [
                    r.token
                    for r in leader.stream_generate(
                        inputs=inputs,
                        max_tokens=spec["max_tokens"],
                        temp=0.0,
                        **spec.get("cache", {}),
                    )
                ]
                for name, inputs in prompts.items()
            }
    if spec["task"] in ("parity", "stop") or group.rank != spec["victim"]:
        follow(model, processor, group)
        return None
    request = receive_request(group)
    for n, _ in enumerate(run_request(model, processor, group, request, Event()), start=1):
        if n == spec["after"]:
            number = signal.SIGKILL if spec["task"] == "die" else signal.SIGSTOP
            (Path(spec["out"]) / f"victim{group.rank}.pid").write_text(str(os.getpid()))
            os.kill(os.getpid(), number)
    return None


def stop_early(model, processor, group, prompts) -> dict[str, list[int]]:
    """Rank 0 closes one stream after 3 tokens, asks another to stop after 3, then answers a
    third prompt in full: what it got, to show every rank stayed in step."""
    from mimo_mlx.distributed.lockstep import Leader

    found = {}
    with Leader(model, processor, group) as leader:
        stream = leader.stream_generate(inputs=prompts["text"], max_tokens=50, temp=0.0)
        found["closed"] = [next(stream).token for _ in range(3)]
        stream.close()
        found["stopped"] = []
        for response in leader.stream_generate(inputs=prompts["text"], max_tokens=50, temp=0.0):
            found["stopped"].append(response.token)
            if len(found["stopped"]) == 3:
                leader.request_stop()
        found["finish_reason"] = [response.finish_reason]
        steps = leader.stream_generate(inputs=prompts["two_images"], max_tokens=16, temp=0.0)
        found["after"] = [response.token for response in steps]
    return found


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except MimoError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
