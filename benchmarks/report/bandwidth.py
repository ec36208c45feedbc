"""Decode against the memory-bandwidth limit: the bytes one decode step reads, over its time, as a
fraction of the copy bandwidth the kernel bounds measured on the same device.

A decode step of one token is memory-bound: it reads every decoder weight once (a 4-bit matmul
reads the packed weight with its scales and biases), one row of the embedding, and the keys and
values of every cached token, and does little arithmetic on them. Bytes / step time is the
bandwidth the step achieves; a copy's bandwidth is about the most any kernel gets.
"""

from __future__ import annotations

import math

from ..synthetic import checkpoint_shapes
from .format import dig

BITS, GROUP_SIZE = 4, 64  # the 4-bit variants (recipes.py)
HALF = ("bfloat16", "float16")


def decode_read_bytes(config: dict, quantized: bool, itemsize: int, positions: float) -> dict:
    """Bytes one decode step reads, by part, for weights computed in `itemsize`-byte floats (the
    4-bit variants' scales and biases too) with `positions` tokens in the cache."""
    text = config.get("text_config") or config
    weights = 0.0
    for name, shape in checkpoint_shapes(config).items():
        if name.startswith("visual."):
            continue
        rows, width = (shape[0], math.prod(shape[1:])) if len(shape) > 1 else (1, shape[0])
        if name == "model.embed_tokens.weight":
            # the token's row; a tied embedding is read whole again as the head
            rows = shape[0] + 1 if config.get("tie_word_embeddings") else 1
        packed = quantized and len(shape) == 2 and width % GROUP_SIZE == 0
        per_row = (
            width * BITS / 8 + 2 * itemsize * width / GROUP_SIZE if packed else width * itemsize
        )
        weights += rows * per_row
    layers, kv_heads = text["num_hidden_layers"], text["num_key_value_heads"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    cache = 2 * layers * kv_heads * head_dim * positions * itemsize
    return {"weights": weights, "kv_cache": cache, "total": weights + cache}


def decode_bandwidth(report: dict) -> dict:
    """Per generation run: bytes read per decode step, the bandwidth its step time achieves, and
    that as a fraction of the measured copy bandwidth (the bare-kernel loop's too, for mimo-mlx)."""
    copy = dig(report.get("kernel_bounds", {}), ("mlx", "copy", "bytes_per_s"))
    config = report["settings"]["config"]
    found = {}
    for key, entry in report["results"]["generate"].items():
        if "error" in entry:
            continue
        itemsize = 2 if entry["backend"]["dtype"] in HALF else 4
        positions = entry["prompt_tokens"] + entry["decode_tokens"] / 2  # the mean over the steps
        read = decode_read_bytes(config, key.endswith("/4bit"), itemsize, positions)
        step = entry["decode_step_s"]["median"]
        row = {
            "bytes_per_token": read,
            "step_s": step,
            "bytes_per_s": read["total"] / step,
            "copy_bytes_per_s": copy,
            "fraction_of_copy": read["total"] / step / copy if copy else None,
        }
        kernels = dig(entry, ("overhead", "kernels_step_s", "median"))
        if kernels:
            row["kernels_step_s"] = kernels
            row["kernels_fraction_of_copy"] = read["total"] / kernels / copy if copy else None
        found[key] = row
    return found
