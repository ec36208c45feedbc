"""Kernel bounds: the backend's measured matmul, exp and softmax rates."""

from __future__ import annotations

from ..format import dig, fmt

ROWS = [
    ("matmul f32 square (1024^3) GFLOPS", ("matmul_gflops_f32", "square_f32")),
    ("matmul f32 ViT MLP (1024x1280x3456) GFLOPS", ("matmul_gflops_f32", "vit_mlp_x1280x3456")),
    ("4-bit quantized matmul 1x4096 @ 4096x4096 GFLOPS", ("quantized_matmul_gflops_4bit", "m1")),
    ("4-bit quantized matmul 64x4096 @ 4096x4096 GFLOPS", ("quantized_matmul_gflops_4bit", "m64")),
    ("MLX exp elements/s", ("elements_per_s", "mlx_exp")),
    ("MLX exp, mx.compile'd, elements/s", ("elements_per_s", "mlx_exp_compiled")),
    ("MLX softmax elements/s", ("elements_per_s", "mlx_softmax")),
    ("MLX add elements/s", ("elements_per_s", "mlx_add")),
    ("numpy exp elements/s", ("elements_per_s", "numpy_exp")),
    (
        "softmax of 1344x1344 full attention (5.4 G exps) s",
        ("full_attention_softmax_1344_s", "at_mlx_softmax_rate"),
    ),
]


def section(report: dict) -> list[str]:
    bounds = report.get("kernel_bounds", {})
    if not bounds:
        return []
    lines = [
        "",
        "## Kernel bounds of this backend",
        "",
        "| measure | " + " | ".join(bounds) + " |",
        "|---|" + "---|" * len(bounds),
    ]
    for label, path in ROWS:
        lines.append(
            f"| {label} | " + " | ".join(fmt(dig(b, path)) for b in bounds.values()) + " |"
        )
    return lines
