"""Peak memory of a prompt's prefill through MiMo-VL's full-width decoder, on the schedule this
backend runs (`generate_step`, whose chunks follow `backend.prefill_schedule`).

    python -m benchmarks.prefill_memory --tokens 4096 --layers 2 --out /tmp/prefill.json

Random weights at the real widths (memory does not depend on their values), float32 on the CPU,
bfloat16 on a GPU; `--layers` decoder layers (MiMo-VL has 36). The prompt is text around the
placeholders of a 1024x1024 image (1,369 tokens), whose features are given (the tower's own peak
is `benchmarks.vision_memory`'s). Reported: the peak above the weights, the KV cache the prompt
leaves (which grows with the layers), and the peak above both, which the schedule keeps from
growing with the layers; and the time to the first token.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import click
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mimo_mlx.generation.loop import DEFAULT_PREFILL_STEP, generate_step
from mimo_mlx.model.backend import device_kind, prefill_schedule
from mimo_mlx.model.config import ModelConfig, VisionConfig
from mimo_mlx.model.mimo_vl import Model

from .machine import provenance, write_json

IMAGE_GRID = (1, 74, 74)  # a 1024x1024 image as the processor sizes it: 37 x 37 merged tokens


def model_with(layers: int, dtype: mx.Dtype) -> Model:
    """MiMo-VL's decoder at full width with `layers` layers; a one-block tower (never run)."""
    config = ModelConfig()
    config = replace(
        config,
        text=replace(config.text, num_hidden_layers=layers),
        vision=VisionConfig(depth=1, fullatt_block_indexes=(0,)),
    )
    model = Model(config)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def image_prompt(model: Model, tokens: int):
    """`tokens` tokens: text, the image's placeholders, text; features given."""
    config = model.config
    placeholders = IMAGE_GRID[1] * IMAGE_GRID[2] // 4
    text = np.random.default_rng(0).integers(0, 150_000, tokens - placeholders - 2)
    half = len(text) // 2
    ids = np.concatenate(
        [
            text[:half],
            [config.vision_start_token_id],
            np.full(placeholders, config.image_token_id),
            [config.vision_end_token_id],
            text[half:],
        ]
    )
    features = mx.random.normal((placeholders, config.text.hidden_size)).astype(
        model.model.norm.weight.dtype
    )
    mx.eval(features)
    return model.prepare_prompt(
        ids[None], image_grid_thw=np.array([IMAGE_GRID]), vision_features=features
    )


def measure(tokens: int, layers: int, step: int) -> dict:
    dtype = mx.float32 if device_kind() == "cpu" else mx.bfloat16
    model = model_with(layers, dtype)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    prompt = image_prompt(model, tokens)
    cache = model.make_cache()
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    start = time.perf_counter()
    steps = generate_step(prompt, model, max_tokens=1, prompt_cache=cache, prefill_step_size=step)
    next(steps)
    seconds = time.perf_counter() - start
    peak = mx.get_peak_memory()
    text = model.config.text
    return {
        "prompt_tokens": prompt.length,
        "image_grid_thw": list(IMAGE_GRID),
        "layers": layers,
        "prefill_step_size": step,
        "device": device_kind(),
        "dtype": str(dtype),
        "layers_per_eval": prefill_schedule(
            device_kind(), dtype, min(step, tokens), text.hidden_size, text.intermediate_size
        ),
        "weight_bytes": weights,
        "held_before_bytes": before - weights,  # the prompt's features and ids
        "peak_bytes": peak,
        "above_weights_bytes": peak - weights,
        "kv_cache_bytes": cache.nbytes,
        "above_weights_and_cache_bytes": peak - weights - cache.nbytes,
        "ttft_s": seconds,
    }


@click.command()
@click.option(
    "--tokens",
    default=4096,
    show_default=True,
    type=click.IntRange(min=IMAGE_GRID[1] * IMAGE_GRID[2] // 4 + 3),
    help="Prompt tokens, the image's 1,371 included.",
)
@click.option("--layers", default=2, show_default=True, help="Decoder layers (MiMo-VL: 36).")
@click.option("--step", default=DEFAULT_PREFILL_STEP, show_default=True, help="Prefill chunk.")
@click.option("--out", type=click.Path(path_type=Path), help="Write the result here as JSON.")
def main(tokens: int, layers: int, step: int, out: Path | None) -> None:
    """Measure one prompt's prefill peak through the full-width decoder (random weights)."""
    result = {
        **provenance("benchmarks.prefill_memory"),
        **measure(tokens, layers, step),
    }
    write_json(result, out)


if __name__ == "__main__":
    main()
