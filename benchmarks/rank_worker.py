"""One rank of the several-ranks scenario: `python -m benchmarks.rank_worker SPEC.json` under
`mlx.launch` (or alone, as a group of one). Writes `rank{N}.json` into the spec's `out` folder.

Each rank loads its part of the folder (weight bytes: in split layers and whole), then:

1. a generation through `Leader` / `follow`, as `mimo-mlx generate` runs it: rank 0's time to
   first token and decode rate; every rank's `mx.get_peak_memory` over it (weights included);
2. the vision tower two ways, taking turns, each rank timing the same passes between barriers:
   split across the ranks (as generation runs it), and whole on rank 0 with the features handed
   to the others by one all_sum (rank 0 loads the whole tower for this after step 1, so step 1's
   peak is the split model's).

Task "vision" runs only step 2, on random weights at a benchmark scale (no folder). With "pin",
each rank runs on one core of its own, as if it had a host to itself.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from mimo_mlx.distributed.group import Group, Watchdog, launched, start_group
from mimo_mlx.distributed.loading import load_sharded_model
from mimo_mlx.distributed.lockstep import Leader, follow
from mimo_mlx.distributed.sharding import (
    ShardedModel,
    module_at,
    replace_module,
    shard_model,
    split_modules,
    weight_bytes,
)
from mimo_mlx.errors import MimoError
from mimo_mlx.inputs.processor import ModelInputs
from mimo_mlx.loading import DTYPES, load_model
from mimo_mlx.model.config import ModelConfig
from mimo_mlx.model.mimo_vl import Model

from .inputs import image_inputs, prompt_ids
from .multiturn import chat_processor
from .stats import summarize
from .synthetic import scaled_config

TIMEOUT_S = 600.0


def join() -> Group:
    """The launcher's group, or a group of one when run alone."""
    if launched():
        return start_group(TIMEOUT_S)
    return Group(mx.distributed.init(), Watchdog(TIMEOUT_S, lambda: "rank 0 of 1"))


def measure_generation(model, processor, group: Group, inputs: ModelInputs, spec: dict) -> dict:
    mx.clear_cache()
    mx.reset_peak_memory()
    if group.rank > 0:
        follow(model, processor, group)
        return {"peak_memory_bytes": mx.get_peak_memory()}
    runs = []
    with Leader(model, processor, group) as leader:
        for _ in range(spec["warmup"] + spec["runs"]):
            start = time.perf_counter()
            stamps = [
                time.perf_counter()
                for _ in leader.stream_generate(
                    inputs=inputs, max_tokens=spec["decode_tokens"], temp=0.0
                )
            ]
            runs.append((stamps[0] - start, (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)))
    runs = runs[spec["warmup"] :]
    return {
        "ttft_s": summarize([ttft for ttft, _ in runs]),
        "decode_tps": summarize([tps for _, tps in runs]),
        "tokens": len(stamps),
        "peak_memory_bytes": mx.get_peak_memory(),
    }


def timed(group: Group, calls: dict, warmup: int, runs: int) -> dict:
    """Seconds of each of `calls` on this rank, every rank starting each call together; the calls
    take turns, so a machine whose load drifts weighs on all of them alike."""
    times = {name: [] for name in calls}
    for n in range(warmup + runs):
        for name, call in calls.items():
            group.barrier("between vision runs")
            start = time.perf_counter()
            call()
            if n >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: summarize(values) for name, values in times.items()}


def measure_vision(model, group: Group, spec: dict, whole_model) -> dict:
    """The tower split across the group vs whole on rank 0 (`whole_model()` builds it there)."""
    pixels, grid = image_inputs(spec["image_size"])
    whole = whole_model() if group.rank == 0 else None
    rows = int(np.prod(grid, axis=1).sum()) // model.config.vision.merge_unit
    shape = (rows, model.config.vision.out_hidden_size)

    def split() -> None:
        mx.eval(model.encode_vision(pixels, grid))

    def on_rank_0() -> None:
        if whole is not None:
            features = whole.encode_vision(pixels, grid)
        else:
            features = mx.zeros(shape, model.visual.patch_embed.proj.weight.dtype)
        mx.eval(mx.distributed.all_sum(features, group=group.mx_group))

    with group.errors():
        found = timed(
            group, {"split": split, "rank0_broadcast": on_rank_0}, spec["warmup"], spec["runs"]
        )
    return {
        "patches": int(pixels.shape[0]),
        **found,
        "split_tower_bytes": _nbytes(model.visual),
        "rank0_tower_bytes": _nbytes(whole.visual) if whole is not None else 0,
    }


def vision_only(group: Group, spec: dict) -> dict:
    """The vision comparison alone, on random weights at a benchmark scale (nothing on disk).

    A group of one also times rank 0's share of a tower split `share` ways, its layers as plain
    Linears with nothing to sum with: one rank's compute, with no other process to wait for
    (which on a host with too few free cores is most of what a split pass measures)."""
    config = ModelConfig.from_hf(scaled_config(spec["scale"]))
    dtype = DTYPES[spec["dtype"]]

    def build(kind: str, share: int = 1) -> Model:
        """The tower "whole", "split" across the group, or rank 0's "share" of `share` ranks."""
        mx.random.seed(0)  # the same whole weights on every rank, each keeping its slices
        model = ShardedModel(config, group) if kind == "split" else Model(config)
        if kind == "split":
            shard_model(model, group.mx_group)
        if kind == "share":
            shard_model(model, _Alone(share))
            for path in split_modules(model):  # the same slices, with nothing to sum with
                layer = module_at(model, path)
                plain = nn.Linear(1, 1, bias="bias" in layer)
                plain.update(layer.parameters())
                replace_module(model, path, plain)
        model.visual.update(tree_map(lambda a: a.astype(dtype), model.visual.parameters()))
        mx.eval(model.visual.parameters())
        return model

    found = {"vision": measure_vision(build("split"), group, spec, lambda: build("whole"))}
    share = spec.get("share")
    if group.size == 1 and share:
        pixels, grid = image_inputs(spec["image_size"])
        whole, part = build("whole"), build("share", share)
        calls = {
            "whole": lambda: mx.eval(whole.encode_vision(pixels, grid)),
            f"share_of_{share}": lambda: mx.eval(part.encode_vision(pixels, grid)),
        }
        found["compute"] = timed(group, calls, spec["warmup"], spec["runs"])
        found["compute"]["share_tower_bytes"] = _nbytes(part.visual)
    return found


class _Alone:
    """Rank 0 of a group of `size` in which no other rank exists: enough to cut the slices."""

    def __init__(self, size: int) -> None:
        self._size = size

    def rank(self) -> int:
        return 0

    def size(self) -> int:
        return self._size


def _nbytes(module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    group = join()
    if spec.get("pin"):  # one core per rank: as if each rank had a host of its own
        os.sched_setaffinity(0, {group.rank % os.cpu_count()})
    out = Path(spec["out"], f"rank{group.rank}.json")
    if spec.get("task") == "vision":
        out.write_text(json.dumps({"rank": group.rank, **vision_only(group, spec)}, indent=2))
        return
    config = json.loads((Path(spec["folder"]) / "config.json").read_text())
    start = time.perf_counter()
    try:
        model = load_sharded_model(spec["folder"], group, dtype=spec["dtype"])
    except MimoError as err:  # e.g. quantization groups this group size would cut in half
        out.write_text(json.dumps({"rank": group.rank, "refused": str(err)}))
        return
    # The synthetic folders hold a bare tokenizer: the multi-turn scenario's processor has the
    # special tokens at the config's ids and a chat template.
    processor = chat_processor(config)
    found = {
        "rank": group.rank,
        "size": group.size,
        "load_s": time.perf_counter() - start,
        "load_peak_bytes": mx.get_peak_memory(),
        "weight_bytes": weight_bytes(model),
    }
    pixels, grid = image_inputs(spec["image_size"])
    ids = prompt_ids(config, grid, spec["text_tokens"])
    inputs = ModelInputs(input_ids=ids, pixel_values=pixels, image_grid_thw=grid)
    with group.errors():
        found["generate"] = measure_generation(model, processor, group, inputs, spec)

    def whole_model() -> Model:
        whole = load_model(spec["folder"], dtype=spec["dtype"], lazy=True)
        mx.eval(whole.visual.parameters())
        return whole

    found["vision"] = measure_vision(model, group, spec, whole_model)
    out.write_text(json.dumps(found, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
