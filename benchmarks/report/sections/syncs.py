"""Host syncs: how often the host waits for the device."""

from __future__ import annotations


def section(report: dict) -> list[str]:
    rows = []
    for runtime, entry in report["results"]["vision"].items():
        for row in entry.get("sizes", []):
            if row.get("host_syncs"):
                rows.append(
                    f"| {runtime} | vision pass {row['size']}x{row['size']} | "
                    f"{row['host_syncs']['host_syncs']} |"
                )
    for key, entry in report["results"]["generate"].items():
        syncs = entry.get("host_syncs")
        if syncs:
            rows.append(
                f"| {key} | prompt to first token | {syncs['to_first_token']['host_syncs']} |"
            )
            rows.append(f"| {key} | per decode step | {syncs['per_decode_step']:.2f} |")
    if not rows:
        return []
    return [
        "",
        "## Host syncs (the host waits for the device: mx.eval, mx.synchronize, item, tolist)",
        "",
        "On a GPU each one is a pipeline bubble. mimo-mlx evaluates a vision pass and a prefill as",
        "they go, to bound what they hold (`backend.vision_schedule`, `prefill_schedule`): on the",
        "CPU every half-block in pieces, on Metal and CUDA every few blocks or layers.",
        "",
        "| runtime | what | host syncs |",
        "|---|---|---|",
        *rows,
    ]
