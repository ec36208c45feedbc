"""The targets a run is judged by, each with what was measured and whether it was met."""

from __future__ import annotations

from ..settings import IMAGE_BOUNDS
from .format import GB, fmt, median, vision_row
from .kernel_floor import vision_weight_bytes

LOOKUP_COPY_SPEEDUP = 1.5  # copy-heavy task: at least this much faster with prompt lookup


LOOKUP_PLAIN_SLOWDOWN = 0.05  # plain tasks: at most this much slower


def _compare(found: list, target: str, ours, theirs, higher_is_better: bool) -> None:
    met = None
    if ours is not None and theirs is not None:
        met = ours >= theirs if higher_is_better else ours <= theirs
    found.append({"target": target, "measured": f"{fmt(ours)} vs {fmt(theirs)}", "met": met})


def targets(report: dict) -> list[dict]:
    """Each target with the measured numbers and whether it is met (None: unmeasured).

    mimo-mlx at least as fast as mlx-vlm on every figure (decode and time to first token per
    variant, vision encode per size); decode overhead above the bare kernels under 5%; the vision
    graph at most half of mlx-vlm's operations; at full scale, an encode's peak over the vision
    weights within #22's bounds (`vision_memory_targets`); on a GPU, the largest image encoded 2x
    faster than mlx-vlm and faster than torch;
    prompt lookup (`lookup_targets`).
    """
    res, found = report["results"], []
    gen = res["generate"]
    for variant in report["settings"]["variants"] if gen else ():
        ours, theirs = gen.get(f"mimo-mlx/{variant}"), gen.get(f"mlx-vlm/{variant}")
        _compare(
            found,
            f"decode tok/s >= mlx-vlm's ({variant})",
            median(ours, "decode_tps"),
            median(theirs, "decode_tps"),
            higher_is_better=True,
        )
        _compare(
            found,
            f"time to first token <= mlx-vlm's ({variant})",
            median(ours, "ttft_s"),
            median(theirs, "ttft_s"),
            higher_is_better=False,
        )
        over = (ours or {}).get("overhead")
        found.append(
            {
                "target": f"decode overhead above the kernels < 5% ({variant})",
                "measured": "-" if not over else f"{100 * over['overhead']:.1f}%",
                "met": None if not over else over["overhead"] < 0.05,
            }
        )
    vision = res["vision"]
    for size in sorted(report["settings"]["sizes"]) if vision else ():
        ours, theirs = (
            vision_row(vision.get("mimo-mlx"), size),
            vision_row(vision.get("mlx-vlm"), size),
        )
        _compare(
            found,
            f"vision {size}x{size} encode s <= mlx-vlm's",
            ours and ours["seconds"]["median"],
            theirs and theirs["seconds"]["median"],
            higher_is_better=False,
        )
    size = max(report["settings"]["sizes"])
    ours = vision_row(vision.get("mimo-mlx"), size)
    on_gpu = (vision.get("mimo-mlx") or {}).get("backend", {}).get("device") == "gpu"
    for other, factor in (("mlx-vlm", 2.0), ("torch", 1.0)) if on_gpu else ():
        theirs = vision_row(vision.get(other), size)
        if ours and theirs:
            speedup = theirs["seconds"]["median"] / ours["seconds"]["median"]
            found.append(
                {
                    "target": f"GPU: vision {size}x{size} >= {factor:g}x faster than {other}",
                    "measured": f"{speedup:.2f}x",
                    "met": speedup >= factor if factor > 1 else speedup > 1,
                }
            )
    for variant, entry in res.get("multiturn", {}).items():
        if "error" not in entry:
            found.append(
                {
                    "target": f"turn 2 TTFT with reuse >= 5x shorter ({variant})",
                    "measured": f"{entry['speedup']:.1f}x",
                    "met": entry["speedup"] >= 5,
                }
            )
    found += lookup_targets(res.get("prompt_lookup", {}))
    ops_a = (vision.get("mimo-mlx") or {}).get("ops", {}).get("ops")
    ops_b = (vision.get("mlx-vlm") or {}).get("ops", {}).get("ops")
    if ops_a and ops_b:
        found.append(
            {
                "target": "vision MLX ops <= half of mlx-vlm's",
                "measured": f"{ops_a} vs {ops_b} ({ops_a / ops_b:.2f})",
                "met": ops_a <= ops_b / 2,
            }
        )
    found += vision_memory_targets(report)
    return found


def vision_memory_targets(report: dict) -> list[dict]:
    """At full scale (MiMo-VL's widths), mimo-mlx's encode peak over the tower's weights within
    the bounds of #22 (IMAGE_BOUNDS, stated for bfloat16: twice the bytes in float32)."""
    vision = report["results"].get("vision") or {}
    entry = vision.get("mimo-mlx") or {}
    if report.get("scale") != "full" or "error" in entry or not entry:
        return []
    itemsize = 4 if entry.get("backend", {}).get("dtype") == "float32" else 2
    weights = vision_weight_bytes(report["settings"]["config"], itemsize)
    found = []
    for size, bound in sorted(IMAGE_BOUNDS.items()):
        row = vision_row(entry, size)
        if not row:
            continue
        limit = bound * itemsize / 2
        over = row["peak_memory_bytes"] - weights
        found.append(
            {
                "target": f"vision {size}x{size} peak over its weights <= {limit / GB:.1f} GB",
                "measured": f"{over / GB:.2f} GB",
                "met": over <= limit,
            }
        )
    return found


def lookup_targets(results: dict) -> list[dict]:
    """Per variant: the same tokens; the copy task 1.5x faster; the others at most 5% slower."""
    found = []
    for variant, entry in results.items():
        if "error" in entry:
            continue
        tasks = entry["tasks"]
        same = all(t["identical"] for t in tasks.values())
        found.append(
            {
                "target": f"prompt lookup: the same greedy tokens on every task ({variant})",
                "measured": "same" if same else "different",
                "met": same,
            }
        )
        for name, task in tasks.items():
            floor = LOOKUP_COPY_SPEEDUP if name == "copy" else 1 - LOOKUP_PLAIN_SLOWDOWN
            found.append(
                {
                    "target": f"prompt lookup, {name} task: tok/s >= {floor:g}x without ({variant})",
                    "measured": f"{task['speedup']:.2f}x",
                    "met": task["speedup"] >= floor,
                }
            )
    return found
