"""results.png: vision time and peak memory per image size, decode tokens/s and TTFT per runtime."""

from __future__ import annotations

from pathlib import Path

GB = 1e9


def _vision_row(entry: dict | None, size: int) -> dict | None:
    if not entry or "error" in entry:
        return None
    return next((s for s in entry["sizes"] if s["size"] == size), None)


def chart(report: dict, path: Path) -> bool:
    """A 2x2 PNG: vision time and peak memory per size, decode tok/s, TTFT. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    res, sizes = report["results"], sorted(report["settings"]["sizes"])
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    runtimes = [r for r in report["settings"]["runtimes"] if r in res["vision"]]
    width = 0.8 / max(1, len(runtimes))
    for i, r in enumerate(runtimes):
        rows = [_vision_row(res["vision"][r], size) for size in sizes]
        xs = [j + i * width for j in range(len(sizes))]
        axes[0, 0].bar(xs, [x["seconds"]["median"] if x else 0 for x in rows], width, label=r)
        axes[0, 1].bar(xs, [x["peak_memory_bytes"] / GB if x else 0 for x in rows], width, label=r)
    for ax, title in (
        (axes[0, 0], "vision encode, s (log)"),
        (axes[0, 1], "vision peak memory, GB"),
    ):
        ax.set_xticks([j + width * (len(runtimes) - 1) / 2 for j in range(len(sizes))])
        ax.set_xticklabels([f"{s}x{s}" for s in sizes])
        ax.set_title(title)
        ax.legend()
    axes[0, 0].set_yscale("log")
    gen = {k: e for k, e in res["generate"].items() if "error" not in e}
    colors = {r: f"C{i}" for i, r in enumerate(report["settings"]["runtimes"])}
    bar_colors = [colors.get(k.split("/")[0], "C7") for k in gen]
    for ax, key, title in (
        (axes[1, 0], "decode_tps", "decode tokens/s"),
        (axes[1, 1], "ttft_s", "time to first token, s"),
    ):
        bars = ax.bar(list(gen), [e[key]["median"] for e in gen.values()], color=bar_colors)
        ax.bar_label(bars, fmt="%.3g")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
    m = report["machine"]
    fig.suptitle(f"mimo-mlx benchmark, scale {report['scale']}: {m['cpu']}, {m['cores']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
