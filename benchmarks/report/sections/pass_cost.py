"""What a forward pass over k tokens costs against one, as prompt lookup's drafts are sized by."""

from __future__ import annotations


def section(report: dict) -> list[str]:
    found = {}
    for variant, entry in report["results"].get("prompt_lookup", {}).items():
        cost = entry.get("pass_cost") or entry.get("partial", {}).get("pass_cost")
        if cost:  # a run killed at its time limit may still have measured it
            found[variant] = cost
    if not found:
        return []
    variants = list(found)
    rows = []
    for i, k in enumerate(next(iter(found.values()))["rows"]):
        cells = [str(k)]
        for cost in found.values():
            probe = cost["probe_ratio"]
            timed = "*" if k in cost.get("probe_measured", ()) else ""
            cells += [
                f"{cost['pass_ratio'][i]:.2f}",
                f"{probe[i]:.2f}{timed}" if i < len(probe) else "-",
                f"{1e3 * cost['first_call_s'][i]:.3g}",
            ]
        rows.append("| " + " | ".join(cells) + " |")
    drafts = "; ".join(
        f"{v}: " + ", ".join(f"{n} at {p}" for p, n in cost["draft_length_at_acceptance"].items())
        for v, cost in found.items()
    )
    header = " | ".join(f"{v} pass / 1 | {v} probe / 1 | {v} first call ms" for v in variants)
    return [
        "",
        "## A forward pass over k tokens against one (mimo-mlx, this device)",
        "",
        "Verifying a draft of n tokens is one pass over n + 1 tokens. pass: the whole model's",
        "forward pass continuing a cache (fastest of 3 after a first call); probe: what prompt",
        "lookup measures when it first drafts (the first decoder layer's gate projection; the",
        "sizes marked * timed, the others interpolated) and sizes its drafts from; first call:",
        "the first pass of each size (on a GPU backend, with compiling its kernels). Draft",
        f"lengths lookup picks, by acceptance rate: {drafts}.",
        "",
        f"| k | {header} |",
        "|" + "---|" * (1 + 3 * len(variants)),
        *rows,
    ]
