"""Vision kernel floor: a pass's work at the measured kernel rates."""

from __future__ import annotations

from ..kernel_floor import floors


def section(report: dict) -> list[str]:
    found = report.get("vision_kernel_floor") or floors(report)
    if not any(v for sizes in found.values() for v in sizes.values()):
        return []
    lines = [
        "",
        "## Vision kernel floor (the backend's kernels alone, measured rates above)",
        "",
        "| bounds | image | matmul TFLOP | matmul s | exps (G) | softmax s | floor s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, sizes in found.items():
        for size, f in sizes.items():
            if f:
                lines.append(
                    f"| {name} | {size} | {f['matmul_flops'] / 1e12:.2f} | {f['matmul_s']:.3g} | "
                    f"{f['exps'] / 1e9:.2f} | {f['softmax_s']:.3g} | {f['floor_s']:.3g} |"
                )
    return lines
