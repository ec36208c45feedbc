"""Multi-turn: a second question about the same image, with and without reuse."""

from __future__ import annotations

from ..format import fmt


def section(report: dict) -> list[str]:
    rows = []
    for variant, entry in report["results"].get("multiturn", {}).items():
        if "error" in entry:
            rows.append(f"| {variant} | failed: {entry['error']} | | | |")
            continue
        for name in ("without_reuse", "with_reuse"):
            e = entry[name]
            rows.append(
                f"| {variant} | {name.replace('_', ' ')} | {e['prompt_tokens']} | "
                f"{e['prefilled_tokens']} | {fmt(e['ttft_s']['median'])} |"
            )
        rows.append(f"| {variant} | speedup | | | {entry['speedup']:.1f}x |")
    if not rows:
        return []
    return [
        "",
        "## Multi-turn: a second question about the same image",
        "",
        "Turn 2 of a conversation whose turn 1 showed the image: with reuse (mimo-mlx's",
        "Conversation: cached tokens kept, the image not encoded again) and without (the whole",
        "conversation through stream_generate from scratch, as a runtime that keeps nothing does).",
        "",
        "| variant | turn 2 | prompt tokens | tokens computed | TTFT s |",
        "|---|---|---|---|---|",
        *rows,
    ]
