"""The decoder's key/value cache at a long context: full precision, 8 bits and 4 bits.

    LD_PRELOAD=/lib/x86_64-linux-gnu/libopenblas.so.0 \\
        python -m benchmarks.kv_cache --out benchmarks/results/kv-cache.json

A decoder of `--layers` layers at MiMo-VL-7B's full widths (hidden 4096; 32 query and 8 key/value
heads of 128; MLP 11,008) with random weights and a 1,024-token vocabulary (the cache depends on
neither the weights nor the vocabulary) takes a `--tokens`-token text prompt (16,384: what a
128-frame video takes at the default frame size) through `generate_step`, prefilled in chunks of
512, then decodes `--decode` tokens; once per cache, in this order: full precision, 8 bits, 4 bits
(groups of 64, quantized from the first token). Per cache it reports:

- cache_bytes: what the cache holds at the end, in the compute dtype (float32 on the CPU,
  bfloat16 on a GPU), the unused tail of its last 256-token step included; cache_bytes_in_use
  without it, and per token and layer;
- bf16_bytes_per_token_layer: the same kind of cache filled with one layer's bfloat16 keys and
  values (what a Mac holds, measured without computing anything), and mimo_vl_7b_cache_bytes:
  that x 36 layers x the prompt's tokens, MiMo-VL-7B's cache for this prompt;
- peak_bytes: `mx.get_peak_memory` over the whole generation, and above the weights; of that,
  only the cache grows with the layer count (the rest is one layer's work at a time):
  projected_36_layers_above_weights = above_weights - cache_bytes + cache_bytes x 36 / layers;
- prefill_s (to the first token) and decode_tps: tokens a second after the first, with the whole
  prompt in the cache.

On the CPU, MLX's attention builds the chunk's whole score matrix (32 heads x 512 x 16,384 float32
values, 1 GiB) for every cache, so the CPU's peak shows that beside the cache; a GPU's fused
attention never holds it. The CPU's quantized matmul is single-threaded, which its decode rate
shows; Apple silicon's is not.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mimo_mlx.generation.loop import generate_step
from mimo_mlx.model.backend import device_kind
from mimo_mlx.model.cache import KVCache, QuantizedKVCache
from mimo_mlx.model.config import ModelConfig, TextConfig, VisionConfig
from mimo_mlx.model.mimo_vl import Model

from .machine import provenance, write_json

MIMO_VL_7B_LAYERS = 36
CACHES = {"float": {}, "8bit": {"kv_bits": 8}, "4bit": {"kv_bits": 4}}
# A vision tower as small as the config allows: the prompt is text, the tower never runs.
SMALL_VISION = VisionConfig(depth=1, hidden_size=64, intermediate_size=64, num_heads=2)
SCALES = {
    "full": TextConfig(vocab_size=1024),  # MiMo-VL-7B's widths
    "tiny": TextConfig(  # for the smoke test
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        mrope_section=(8, 12, 12),
    ),
}


def build(scale: str, layers: int) -> tuple[Model, int]:
    """The decoder (evaluated, in the backend's compute dtype) and its weight bytes."""
    text = TextConfig(**{**vars(SCALES[scale]), "num_hidden_layers": layers})
    vision = VisionConfig(**{**vars(SMALL_VISION), "out_hidden_size": text.hidden_size})
    model = Model(ModelConfig(text=text, vision=vision))
    model.set_dtype(mx.float32 if device_kind() == "cpu" else mx.bfloat16)
    mx.eval(model.parameters())
    return model, sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def bf16_bytes_per_token_layer(kind: str, config: TextConfig, tokens: int) -> float:
    """One layer's cache of `kind` filled with `tokens` bfloat16 keys and values, per token."""
    options = CACHES[kind]
    layer = QuantizedKVCache(options["kv_bits"], 64) if options else KVCache()
    rng = np.random.default_rng(0)
    shape = (1, config.num_key_value_heads, 512, config.head_dim)
    for start in range(0, tokens, 512):
        rows = min(512, tokens - start)
        keys, values = (
            mx.array(rng.standard_normal(shape).astype(np.float32))[:, :, :rows].astype(mx.bfloat16)
            for _ in range(2)
        )
        layer.update_and_fetch(keys, values)
        mx.eval(layer.state)
    return sum(a.nbytes for a in layer.state) / tokens


def measure(model: Model, weights: int, kind: str, tokens: int, decode: int) -> dict:
    config = model.config.text
    prompt = np.random.default_rng(1).integers(0, config.vocab_size, (1, tokens))
    cache = model.make_cache(**CACHES[kind])
    mx.synchronize()
    mx.reset_peak_memory()
    start = time.perf_counter()
    times = []
    for _ in generate_step(prompt, model, max_tokens=decode, prompt_cache=cache):
        times.append(time.perf_counter())
    peak = mx.get_peak_memory()
    layers = config.num_hidden_layers
    held = cache.nbytes
    in_use = sum(a.nbytes for state in cache.state for a in state)
    per_layer_bf16 = bf16_bytes_per_token_layer(kind, config, tokens)
    above = peak - weights
    return {
        "cache": kind,
        "options": CACHES[kind],
        "quantized": cache.quantized,
        "cache_tokens": cache.offset,
        "cache_bytes": held,
        "cache_bytes_in_use": in_use,
        "cache_bytes_per_token_layer": in_use / cache.offset / layers,
        "bf16_bytes_per_token_layer": per_layer_bf16,
        "mimo_vl_7b_cache_bytes": per_layer_bf16 * MIMO_VL_7B_LAYERS * tokens,
        "peak_bytes": peak,
        "above_weights_bytes": above,
        "projected_36_layers_above_weights": above - held + held * MIMO_VL_7B_LAYERS / layers,
        "prefill_s": times[0] - start,
        "decode_tps": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else None,
    }


@click.command()
@click.option("--layers", default=2, show_default=True, help="Full-width decoder layers.")
@click.option("--tokens", default=16384, show_default=True, help="Prompt tokens.")
@click.option("--decode", default=8, show_default=True, help="Tokens decoded after the prompt.")
@click.option("--caches", default="float,8bit,4bit", show_default=True)
@click.option("--scale", type=click.Choice(list(SCALES)), default="full", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Write the result here as JSON.")
def main(layers: int, tokens: int, decode: int, caches: str, scale: str, out: Path | None) -> None:
    """Measure the cache's bytes, the generation's peak and the decode rate per cache kind."""
    kinds = [k for k in caches.split(",") if k]
    if unknown := sorted(set(kinds) - set(CACHES)):
        raise click.BadParameter(f"unknown cache kind(s) {unknown}", param_hint="--caches")
    model, weights = build(scale, layers)
    rows = []
    for kind in kinds:
        rows.append(measure(model, weights, kind, tokens, decode))
        click.echo(json.dumps(rows[-1]), err=True)
    base = next((r for r in rows if r["cache"] == "float"), None)
    for row in rows:
        if base is not None:
            row["cache_vs_float"] = row["cache_bytes"] / base["cache_bytes"]
            row["bf16_vs_float"] = (
                row["bf16_bytes_per_token_layer"] / (base["bf16_bytes_per_token_layer"])
            )
    result = {
        **provenance("benchmarks.kv_cache"),
        "ld_preload": os.environ.get("LD_PRELOAD"),
        "device": device_kind(),
        "scale": scale,
        "layers": layers,
        "tokens": tokens,
        "decode": decode,
        "weight_bytes": weights,
        "results": rows,
    }
    write_json(result, out)


if __name__ == "__main__":
    main()
