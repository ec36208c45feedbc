"""One measurement in a fresh process: `python -m benchmarks.worker SPEC.json RESULT.json`.

A fresh process per runtime and task keeps peak-memory readings honest (nothing left over from
another runtime) and lets a runtime that is missing or fails take down its own measurement only.
A task that reports progress writes it beside the result (RESULT.partial.json) as it goes, so a
process killed at its time limit still says how far it got.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from .inputs import image_inputs, prompt_ids
from .stats import summarize, time_calls

RUNNERS = {"mimo-mlx": "mimo", "mlx-vlm": "mlx_vlm", "torch": "torch_hf"}


def runner_module(runtime: str):
    return importlib.import_module(f"benchmarks.runners.{RUNNERS[runtime]}")


def backend(runtime: str, dtype: str | None) -> dict:
    """Device, dtype and threads the runtime computes with in this process."""
    if runtime == "torch":
        import torch

        from .runners.torch_hf import ATTENTION, pick_device

        device, torch_dtype = pick_device()
        return {
            "device": str(device),
            "dtype": str(torch_dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "attention": ATTENTION,
        }
    import mlx.core as mx

    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    return {"device": device, "dtype": dtype, "metal": mx.metal.is_available()}


def measure_vision(spec: dict) -> dict:
    """Encode time and peak memory per image size, sizes ascending (see MemoryReading)."""
    module = runner_module(spec["runtime"])
    start = time.perf_counter()
    runner = module.Vision(Path(spec["folder"]), spec["dtype"])
    result = {"load_s": time.perf_counter() - start, "sizes": []}
    for plan in sorted(spec["sizes"], key=lambda p: p["size"]):
        pixels, grid = image_inputs(plan["size"])
        runner.reset_peak()
        times = time_calls(partial(runner.encode, pixels, grid), plan["warmup"], plan["runs"])
        memory = runner.peak()
        syncs = _syncs(spec["runtime"], partial(runner.encode, pixels, grid))
        result["sizes"].append(
            {
                "host_syncs": syncs,
                "size": plan["size"],
                "grid_thw": grid[0].tolist(),
                "patches": int(pixels.shape[0]),
                "warmup": plan["warmup"],
                "seconds": summarize(times),
                "peak_memory_bytes": memory.bytes,
                "memory_method": memory.method,
            }
        )
    if spec.get("opcount"):
        from .opcount import count_vision_ops

        size = spec["opcount"]
        pixels, grid = image_inputs(size)
        result["ops"] = {"size": size, **count_vision_ops(spec["runtime"], runner, pixels, grid)}
    return result


def generation(spec: dict) -> tuple:
    """A generate spec's runner, loaded, and its prompt: (runner, ids, pixels, grid)."""
    config = json.loads((Path(spec["folder"]) / "config.json").read_text())
    module = runner_module(spec["runtime"])
    runner = module.Generate(Path(spec["folder"]), spec["dtype"], spec.get("recipe"))
    pixels, grid = image_inputs(spec["image_size"])
    return runner, prompt_ids(config, grid, spec["text_tokens"]), pixels, grid


def measure_generate(spec: dict) -> dict:
    """TTFT (vision + prefill) and its peak memory, prefill and decode tokens/s, peak memory over
    whole generations."""
    start = time.perf_counter()
    runner, ids, pixels, grid = generation(spec)
    load_s = time.perf_counter() - start
    n = spec["decode_tokens"]
    ttft, prefill, decode, step, tokens = [], [], [], [], None
    runner.reset_peak()
    for run in range(spec["warmup"] + spec["runs"]):
        start = time.perf_counter()
        out = runner.generate(ids, pixels, grid, n)
        if len(out) != n:
            raise RuntimeError(f"{spec['runtime']} produced {len(out)} tokens, not {n}")
        if run < spec["warmup"]:
            continue
        first, last = out[0][1] - start, out[-1][1] - out[0][1]
        ttft.append(first)
        prefill.append(ids.shape[1] / first)
        decode.append((n - 1) / last)
        step.append(last / (n - 1))
        tokens = [t for t, _ in out]
    memory = runner.peak()
    runner.reset_peak()  # to the first token alone: the vision pass and the prefill
    runner.generate(ids, pixels, grid, 1)
    first_token_memory = runner.peak()
    first_token = _syncs(spec["runtime"], partial(runner.generate, ids, pixels, grid, 1))
    whole = _syncs(spec["runtime"], partial(runner.generate, ids, pixels, grid, n))
    result = {
        "host_syncs": (
            None
            if first_token is None
            else {
                "to_first_token": first_token,
                "per_decode_step": (whole["host_syncs"] - first_token["host_syncs"]) / (n - 1),
            }
        ),
        "load_s": load_s,
        "recipe": spec.get("recipe"),
        "prompt_tokens": int(ids.shape[1]),
        "image_size": spec["image_size"],
        "grid_thw": grid[0].tolist(),
        "decode_tokens": n,
        "warmup": spec["warmup"],
        "ttft_s": summarize(ttft),
        "ttft_peak_memory_bytes": first_token_memory.bytes,
        "prefill_tps": summarize(prefill),
        "decode_tps": summarize(decode),
        "decode_step_s": summarize(step),
        "peak_memory_bytes": memory.bytes,
        "memory_method": memory.method,
        "tokens": tokens,
    }
    if spec["runtime"] != "torch":
        from .recipes import fingerprint

        result["quantized_fingerprint"] = fingerprint(runner.model)
    if spec.get("overhead"):
        from .overhead import kernel_step_seconds

        kernel = kernel_step_seconds(runner.model, int(ids.shape[1]), n, spec["runs"])
        ours = result["decode_step_s"]["median"]
        result["overhead"] = {
            "kernels_step_s": summarize(kernel),
            "step_s": ours,
            "overhead": ours / summarize(kernel)["median"] - 1.0,
        }
    return result


def _syncs(runtime: str, run) -> dict | None:
    """Host syncs (and async evals) of one call of `run`, for the MLX runtimes."""
    if runtime == "torch":
        return None
    from .syncs import count_syncs, host_syncs

    with count_syncs() as counts:
        run()
    return {"host_syncs": host_syncs(counts), "by_kind": dict(counts)}


def mimo_model(spec: dict):
    from .runners.mimo import load_variant

    return load_variant(Path(spec["folder"]), spec["dtype"], spec.get("recipe"))


def measure_multiturn(spec: dict, progress: Callable[[dict], None]) -> dict:
    """A second question about the same image, with and without the conversation's reuse."""
    from .multiturn import measure

    config = json.loads((Path(spec["folder"]) / "config.json").read_text())
    return measure(
        mimo_model(spec),
        config,
        spec["image_size"],
        spec["answer_tokens"],
        spec["warmup"],
        spec["runs"],
    )


def measure_lookup(spec: dict, progress: Callable[[dict], None]) -> dict:
    """Greedy decoding with and without prompt lookup, copy-heavy and plain tasks."""
    from .lookup import measure

    start = time.perf_counter()
    model = mimo_model(spec)
    load_s = time.perf_counter() - start
    progress({"load_s": load_s})
    found = measure(
        model,
        spec["image_size"],
        spec["answer_tokens"],
        spec["warmup"],
        spec["runs"],
        progress=lambda partial: progress({"load_s": load_s, **partial}),
    )
    return {"load_s": load_s, **found}


PRECOMPILE_TOKENS = 16  # tokens a precompile pass decodes (prompt lookup: twice as many)


def precompile(spec: dict, progress: Callable[[dict], None]) -> dict:
    """A measurement's first pass and nothing timed (the spec under "of"): loads what it loads
    and runs the passes it runs, on the same inputs, so that MLX compiles the kernels they use
    (see `run.Session.precompile`). Prompt lookup runs its pass-cost table (passes over 1 to 16
    tokens) and each task once, with short answers."""
    inner = spec["of"]
    task, runtime = inner["task"], inner["runtime"]
    if task == "vision":
        runner = runner_module(runtime).Vision(Path(inner["folder"]), inner["dtype"])
        for plan in inner["sizes"]:
            runner.encode(*image_inputs(plan["size"]))
    elif task == "generate":
        runner, ids, pixels, grid = generation(inner)
        runner.generate(ids, pixels, grid, PRECOMPILE_TOKENS)
    elif task == "lookup":
        from .lookup import measure

        measure(mimo_model(inner), inner["image_size"], 2 * PRECOMPILE_TOKENS, 0, 1, progress)
    else:
        raise ValueError(f"no precompile pass for task {task!r}")
    return {"of": task, "runtime": runtime, "variant": inner.get("variant")}


def make_weights(spec: dict) -> dict:
    """The synthetic checkpoint for a scale, drawn on this process's default device."""
    import mlx.core as mx

    from .settings import model_parameters
    from .synthetic import scaled_config
    from .weights import complete, make_synthetic, synthetic_folder

    cache, scale = Path(spec["cache"]), spec["scale"]
    start = time.perf_counter()
    made = not complete(synthetic_folder(cache, scale))
    folder = make_synthetic(cache, scale, log=lambda message: print(message, flush=True))
    shards = sorted(folder.glob("*.safetensors"))
    return {
        "folder": str(folder),
        "made": made,  # False: a complete folder was already in the cache
        "device": str(mx.default_device()),
        "parameters": model_parameters(scaled_config(scale)),
        "bytes": sum(f.stat().st_size for f in shards),
        "shards": len(shards),
        "seconds": time.perf_counter() - start,
    }


def _without_progress(measure: Callable[[dict], dict]):
    return lambda spec, progress: measure(spec)


TASKS = {
    "vision": _without_progress(measure_vision),
    "generate": _without_progress(measure_generate),
    "multiturn": measure_multiturn,
    "lookup": measure_lookup,
    "precompile": precompile,
}


def partial_path(result_path: str | Path) -> Path:
    """Where a worker writes its progress (RESULT.partial.json)."""
    path = Path(result_path)
    return path.with_name(path.stem + ".partial.json")


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    start = time.perf_counter()

    def progress(partial: dict) -> None:
        elapsed = {"progress_at_s": time.perf_counter() - start}
        partial_path(result_path).write_text(json.dumps({**partial, **elapsed}, default=_plain))

    if spec["task"] == "kernels":
        from .kernels import kernel_bounds

        result = kernel_bounds(**spec.get("options", {}))
    elif spec["task"] == "weights":
        result = make_weights(spec)
    else:
        measure = TASKS[spec["task"]]
        measured = spec.get("of", spec)  # a precompile pass's: its measurement's
        result = {
            "backend": backend(measured["runtime"], measured.get("dtype")),
            **measure(spec, progress),
        }
    result["wall_s"] = time.perf_counter() - start
    result["ld_preload"] = os.environ.get("LD_PRELOAD", "")
    Path(result_path).write_text(json.dumps(result, indent=2, default=_plain))


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
