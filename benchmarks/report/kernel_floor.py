"""What the backend's kernels alone need for a vision pass: a model of its work (matmul FLOPs,
softmax exponentials) at the measured kernel rates."""

from __future__ import annotations

import math

from ..synthetic import checkpoint_shapes
from .format import dig


def vision_weight_bytes(config: dict, bytes_per_param: int = 4) -> int:
    """Vision tower and merger weights in the dtype they are computed in."""
    shapes = checkpoint_shapes(config)
    return bytes_per_param * sum(math.prod(s) for k, s in shapes.items() if k.startswith("visual."))


def vision_work(config: dict, size: int) -> dict:
    """FLOPs of matmuls and count of softmax exps in one vision pass over a size x size image.

    Linear layers: 2 * rows * weights; attention: QK^T and PV (4 * N * keys * C) and N * keys
    exps per head, with N keys per frame in full-attention blocks and one window's patches in the
    others; patch embedding and merger included. Window padding at image edges is ignored.
    """
    v = config["vision_config"]
    c, inner, heads, depth = v["hidden_size"], v["intermediate_size"], v["num_heads"], v["depth"]
    merge, out = v["spatial_merge_size"] ** 2, v["out_hidden_size"]
    side = 2 * round(size / 28)  # patches per side after the processor resizes to 28k
    n = side * side
    window = min(n, (v["window_size"] // v["patch_size"]) ** 2)
    full = len(v["fullatt_block_indexes"])
    linear = 2 * n * (4 * c * c + 3 * c * inner) * depth
    linear += 2 * n * 1176 * c + 2 * (n // merge) * ((merge * c) ** 2 + merge * c * out)
    keys = full * n + (depth - full) * window  # keys per query, summed over blocks
    return {"patches": n, "matmul_flops": linear + 4 * n * keys * c, "exps": n * keys * heads}


def vision_floor(config: dict, size: int, bounds: dict) -> dict | None:
    """Seconds the backend's kernels alone need for one vision pass (matmuls at the measured ViT
    matmul rate, exps at the measured softmax rate, nothing overlapped)."""
    gflops = dig(bounds, ("matmul_gflops_f32", "vit_mlp_x1280x3456"))
    rate = dig(bounds, ("elements_per_s", "mlx_softmax"))
    if not gflops or not rate:
        return None
    work = vision_work(config, size)
    matmul_s, softmax_s = work["matmul_flops"] / (gflops * 1e9), work["exps"] / rate
    return {**work, "matmul_s": matmul_s, "softmax_s": softmax_s, "floor_s": matmul_s + softmax_s}


def floors(report: dict) -> dict:
    """Per kernel-bounds run (as is / OpenBLAS) and image size: the vision pass's kernel floor."""
    config = report["settings"]["config"]
    return {
        name: {str(size): vision_floor(config, size, b) for size in report["settings"]["sizes"]}
        for name, b in report.get("kernel_bounds", {}).items()
        if "error" not in b
    }
