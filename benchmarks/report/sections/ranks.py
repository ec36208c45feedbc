"""Several ranks: each rank's memory against its bound, and the vision tower split or on rank 0."""

from __future__ import annotations

from ...settings import MB, MEMORY_SLACK


def ranks_markdown(results: dict) -> list[str]:
    """The scenario's tables: per-rank memory against the bound, and the vision tower two ways."""
    if not results:
        return []
    lines = [
        "",
        "## Several ranks (mlx.launch, ring on 127.0.0.1; one generation with an image)",
        "",
        "| variant | ranks | rank | weights MB | bound MB (split / N + whole) | peak MB "
        f"| peak - weights MB | peak / bound | within +{100 * MEMORY_SLACK:.0f}% | TTFT s "
        "| decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    vision = []
    for variant, entry in results.items():
        summary, runs = entry["summary"], entry["runs"]
        if not summary:
            failed = next(
                (r[0] for r in runs.values() if "error" in r[0]), {"error": "no 1-rank run"}
            )
            lines.append(f"| {variant} | failed: {failed['error']} | | | | | | | | | |")
            continue
        for n in runs:
            if n in summary["refused"]:
                lines.append(
                    f"| {variant} | {n} | refused: {summary['refused'][n]} | | | | | | | | |"
                )
                continue
            run = summary["runs"][n]
            for check, rank in zip(run["memory"], runs[n], strict=True):
                timing = rank["generate"] if rank["rank"] == 0 else {}
                ttft = timing.get("ttft_s", {}).get("median")
                tps = timing.get("decode_tps", {}).get("median")
                lines.append(
                    f"| {variant} | {n} | {check['rank']} | {check['weight_bytes'] / MB:.1f} | "
                    f"{check['expected_bytes'] / MB:.1f} | {check['peak_memory_bytes'] / MB:.1f} | "
                    f"{(check['peak_memory_bytes'] - check['weight_bytes']) / MB:.1f} | "
                    f"{check['peak_over_expected']:.2f} | {'yes' if check['within_slack'] else 'no'} | "
                    f"{'' if ttft is None else f'{ttft:.3g}'} | {'' if tps is None else f'{tps:.3g}'} |"
                )
            v = run["vision"]
            even = v["break_even_bytes_per_s"]
            vision.append(
                f"| {variant} | {n} | {v['split_s']:.3g} | {v['rank0_broadcast_s']:.3g} | "
                f"{v['split_bytes'] / MB:.1f} / {v['rank0_broadcast_bytes'] / MB:.1f} | "
                f"{'-' if even is None else f'{even / 1e9:.2f} GB/s'} |"
            )
    lines += [
        "",
        "Weights: this rank's parameters (split layers' slices and whole tensors); bound: 1/N of "
        "the split weights plus the whole ones, as measured on 1 rank; peak: `mx.get_peak_memory` "
        "over the generation (weights, activations, KV cache); peak - weights: what the rank holds "
        "above its own weights.",
        "",
        "Vision tower, one image, slowest rank's median seconds: split across the ranks, or whole "
        "on rank 0 and its features sent to the others. MB each rank sends per pass (split / "
        "broadcast); break-even: on a link slower than this the whole tower on rank 0 is faster.",
        "",
        "| variant | ranks | split s | rank 0 + broadcast s | MB sent per pass | break-even link |",
        "|---|---|---|---|---|---|",
        *vision,
    ]
    return lines


def section(report: dict) -> list[str]:
    return ranks_markdown(report["results"].get("ranks", {}))
