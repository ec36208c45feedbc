"""MLX operations in one vision pass."""

from __future__ import annotations


def section(report: dict) -> list[str]:
    ops = {r: e["ops"] for r, e in report["results"]["vision"].items() if e.get("ops")}
    if not ops:
        return []
    lines = [
        "",
        "## MLX operations in one vision forward pass",
        "",
        "| runtime | image | ops | top primitives | note |",
        "|---|---|---|---|---|",
    ]
    for r, o in ops.items():
        top = ", ".join(f"{k} {n}" for k, n in list(o.get("by_op", {}).items())[:5])
        lines.append(f"| {r} | {o['size']} | {o['ops']} | {top} | {o.get('note', '')} |")
    return lines
