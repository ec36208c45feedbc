"""Vision tower: seconds and peak memory per image size and runtime."""

from __future__ import annotations

from ..format import GB, fmt, vision_row


def section(report: dict) -> list[str]:
    res = report["results"]["vision"]
    runtimes = [r for r in report["settings"]["runtimes"] if r in res]
    if not runtimes:
        return []
    lines = [
        "",
        "## Vision tower (encode one image; seconds, median (spread); peak memory)",
        "",
        "| image | patches | "
        + " | ".join(f"{r} s | {r} peak GB" for r in runtimes)
        + " | mlx-vlm / mimo-mlx | torch / mimo-mlx |",
        "|" + "---|" * (2 + 2 * len(runtimes) + 2),
    ]
    for size in sorted(report["settings"]["sizes"]):
        rows = {r: vision_row(res[r], size) for r in runtimes}
        any_row = next((x for x in rows.values() if x), None)
        cells = [f"{size}x{size}", str(any_row["patches"]) if any_row else "-"]
        for row in rows.values():
            cells += (
                [
                    f"{row['seconds']['median']:.3g} ({100 * row['seconds']['spread']:.0f}%)",
                    f"{row['peak_memory_bytes'] / GB:.2f}",
                ]
                if row
                else ["-", "-"]
            )
        ours = rows.get("mimo-mlx")
        for other in ("mlx-vlm", "torch"):
            row = rows.get(other)
            ratio = row["seconds"]["median"] / ours["seconds"]["median"] if row and ours else None
            cells.append(fmt(ratio, 3, "x"))
        lines.append("| " + " | ".join(cells) + " |")
    done = {r: e["sizes"] for r, e in res.items() if e.get("sizes")}
    grids = {row["size"]: row["grid_thw"] for rows in done.values() for row in rows}
    resized = ", ".join(f"{size} -> {14 * g[1]}x{14 * g[2]}" for size, g in sorted(grids.items()))
    methods = "; ".join(f"{r}: {rows[0]['memory_method']}" for r, rows in done.items())
    lines += ["", f"Images are resized to multiples of 28 as the processor does ({resized})."]
    lines += [f"Peak memory: {methods}."]
    lines += [
        f"{r} failed: {e['error']} (see work/vision-{r}.log)"
        for r, e in res.items()
        if "error" in e
    ]
    return lines
