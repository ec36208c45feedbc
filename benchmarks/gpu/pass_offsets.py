"""What a decoder pass over k tokens costs at a cache length it has not seen yet, on this backend:
`python -m benchmarks.gpu.pass_offsets --out offsets.json`.

Prompt lookup verifies each draft with one pass over k = draft + 1 tokens, and every verification
continues the cache at a new length. On an H200 a 9-token verification took about 65 ms against
about 8 ms for a decode step, while the same pass repeated at one cache length cost 1.2 steps.
The cause, in MLX's source: its CUDA build runs attention over more than one query through
cuDNN, which builds a graph per new shape of queries and keys; since then mimo-mlx runs 2 to 16
queries as plain matmuls there (`backend.plain_attention`). This probe times passes of k tokens
at successive new cache lengths and again at a length already seen, through MiMo-VL's full-width
decoder with a few layers (random weights): the sizes up to 16 show the plain path, 17 and up
(prefill chunks) what cuDNN's builds cost a prompt of a length not seen before.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import mlx.core as mx
import numpy as np

from mimo_mlx.model.backend import device_kind

from ..machine import provenance, write_json
from ..prefill_memory import model_with


@click.command()
@click.option("--layers", default=2, show_default=True)
@click.option("--context", default=1024, show_default=True, help="Prompt tokens first.")
@click.option("--ks", default="1,4,8,9,12,16,17,64,512", show_default=True, help="Pass sizes.")
@click.option("--steps", default=6, show_default=True, help="New cache lengths per size.")
@click.option("--out", type=click.Path(path_type=Path))
def main(layers: int, context: int, ks: str, steps: int, out: Path | None) -> None:
    """Time passes over k tokens at new and at seen cache lengths."""
    dtype = mx.float32 if device_kind() == "cpu" else mx.bfloat16
    model = model_with(layers, dtype)
    rng = np.random.default_rng(0)
    cache = model.make_cache()
    prompt = model.prepare_prompt(rng.integers(0, 150_000, (1, context)), cache=cache)
    mx.eval(model(**prompt.chunk(0), cache=cache, logits_to_keep=1))
    results = []
    for k in (int(s) for s in ks.split(",")):
        tokens = mx.array(rng.integers(0, 150_000, (1, k)))
        new = []
        for _ in range(steps):  # each pass at a cache length not seen before
            start = time.perf_counter()
            mx.eval(model(tokens, cache=cache))
            new.append(time.perf_counter() - start)
        seen = []
        for _ in range(steps):  # the same length again and again
            cache.trim(k)
            start = time.perf_counter()
            mx.eval(model(tokens, cache=cache))
            seen.append(time.perf_counter() - start)
        results.append({"k": k, "new_length_s": new, "seen_length_s": seen})
        click.echo(json.dumps(results[-1]), err=True)
    report = {
        **provenance("benchmarks.gpu.pass_offsets"),
        "device": device_kind(),
        "dtype": str(dtype),
        "layers": layers,
        "context": context,
        "results": results,
    }
    write_json(report, out, echo=False)


if __name__ == "__main__":
    main()
