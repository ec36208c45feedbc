"""Decode against the bandwidth limit: tokens/s, step time, the bare-kernel loop, bytes/token."""

from __future__ import annotations

from ..bandwidth import decode_bandwidth
from ..format import GB, fmt


def section(report: dict) -> list[str]:
    found = report.get("decode_bandwidth") or decode_bandwidth(report)
    if not found:
        return []
    rows = []
    for key, row in found.items():
        runtime, variant = key.split("/")
        entry = report["results"]["generate"][key]
        kernels = row.get("kernels_step_s")
        share = row["fraction_of_copy"]
        bare = row.get("kernels_fraction_of_copy")
        rows.append(
            f"| {runtime} | {variant} | {fmt(entry['decode_tps']['median'])} | "
            f"{1e3 * row['step_s']:.3g} | {'-' if not kernels else f'{1e3 * kernels:.3g}'} | "
            f"{row['bytes_per_token']['total'] / GB:.3g} | {row['bytes_per_s'] / GB:.3g} | "
            f"{'-' if share is None else f'{100 * share:.0f}%'} | "
            f"{'-' if bare is None else f'{100 * bare:.0f}%'} |"
        )
    copy = next(iter(found.values()))["copy_bytes_per_s"]
    return [
        "",
        "## Decode against the bandwidth limit",
        "",
        "A decode step reads every decoder weight once (4-bit: the packed weights with their",
        "scales and biases), one embedding row and the KV cache (at the mean position of the",
        "decoded tokens); bytes / step time is the bandwidth it achieves, shown as a share of",
        "an elementwise copy's bandwidth on the same device"
        + (f" ({copy / GB:,.0f} GB/s, read + written)." if copy else " (not measured)."),
        "The bare-kernel loop runs the same kernels over the same weights (decode overhead).",
        "On a CPU that copy runs on one core while a threaded BLAS reads on all of them, so",
        "shares above 100% happen there: the figure is meant for GPUs.",
        "",
        "| runtime | variant | decode tok/s | ms/step | bare kernels ms/step | GB read/token "
        "| GB/s | of copy bandwidth | bare kernels, of copy |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
