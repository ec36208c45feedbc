"""Decode overhead: mimo-mlx's step against the same kernels in a bare loop."""

from __future__ import annotations


def section(report: dict) -> list[str]:
    rows = [
        f"| {key.split('/')[1]} | {1e3 * o['step_s']:.3f} | "
        f"{1e3 * o['kernels_step_s']['median']:.3f} | {100 * o['overhead']:.1f}% |"
        for key, entry in report["results"]["generate"].items()
        if (o := entry.get("overhead"))
    ]
    if not rows:
        return []
    return [
        "",
        "## Decode overhead (mimo-mlx step vs the same MLX kernels alone)",
        "",
        "| variant | mimo-mlx ms/step | kernels ms/step | overhead |",
        "|---|---|---|---|",
        *rows,
    ]
