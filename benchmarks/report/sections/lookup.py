"""Prompt lookup: tokens per pass, acceptance and speedup per task."""

from __future__ import annotations

from ..format import fmt


def section(report: dict) -> list[str]:
    rows = []
    for variant, entry in report["results"].get("prompt_lookup", {}).items():
        if "error" in entry:
            rows.append(f"| {variant} | failed: {entry['error']} | | | | | |")
            continue
        for name, task in entry["tasks"].items():
            for mode in ("without", "with"):
                e = task[mode]
                speedup = f"{task['speedup']:.2f}x" if mode == "with" else ""
                drafts = f"{e['accepted']} / {e['drafted']}" if mode == "with" else ""
                rows.append(
                    f"| {variant} | {name} | {mode} | {e['tokens_per_pass']:.2f} | {drafts} | "
                    f"{fmt(e['decode_tps']['median'])} | {speedup} |"
                )
    if not rows:
        return []
    entries = report["results"]["prompt_lookup"].values()
    tokens = next(
        (e.get("answer_tokens") or e.get("partial", {}).get("answer_tokens") for e in entries), None
    )
    answer = f"A {tokens}-token answer" if tokens else "An answer"
    return [
        "",
        "## Prompt lookup (mimo-mlx, greedy)",
        "",
        f"{answer} with and without prompt lookup on a synthetic model whose",
        "greedy choice follows a fixed chain of tokens (benchmarks/lookup.py). copy: the prompt",
        "holds the chain, so the answer repeats prompt text; plain: random text instead; shuffled:",
        "the chain's tokens in random order (every lookup finds a match, every draft would be wrong).",
        "This measures the mechanism, not MiMo-VL's acceptance rates. On a CPU, MLX's quantized",
        "matmul costs a decode step per verified token, so 4-bit cannot gain there: lookup",
        "measures what a pass over k tokens costs (below) and drafts nothing where none can pay.",
        "",
        "| variant | task | lookup | tokens/pass | accepted / drafted | decode tok/s | speedup |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
