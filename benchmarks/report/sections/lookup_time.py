"""Where prompt lookup's decode time went: drafting, verification passes, trims, the rest."""

from __future__ import annotations

PARTS = ("drafting", "verifying", "trimming", "measuring", "steps")


def section(report: dict) -> list[str]:
    rows = []
    for variant, entry in report["results"].get("prompt_lookup", {}).items():
        tasks = entry.get("tasks") or entry.get("partial", {}).get("tasks", {})
        for name, task in tasks.items():
            for mode in ("without", "with"):
                seconds = task[mode].get("seconds")
                if not seconds:
                    continue
                cells = [
                    f"{1e3 * seconds[p]['median']:.1f}" if p in seconds else "-" for p in PARTS
                ]
                rows.append(
                    f"| {variant} | {name} | {mode} | {1e3 * seconds['decode']['median']:.1f} | "
                    + " | ".join(cells)
                    + f" | {task[mode].get('verifications', 0)} |"
                )
    phases = {
        v: e.get("phases_s") or e.get("partial", {}).get("phases_s")
        for v, e in report["results"].get("prompt_lookup", {}).items()
    }
    notes = [
        f"{v}: " + ", ".join(f"{k} {s:.1f} s" for k, s in p.items()) for v, p in phases.items() if p
    ]
    if not rows and not notes:
        return []
    table = [
        "",
        "| variant | task | lookup | decode | " + " | ".join(PARTS) + " | verifications |",
        "|---|---|---|---|" + "---|" * len(PARTS) + "---|",
        *rows,
    ]
    return [
        "",
        "## Where prompt lookup's decode time went (ms, median per answer)",
        "",
        "drafting: host lookups; verifying: from queueing a verification pass to its tokens on the",
        "host; trimming: cutting rejected tokens from the cache; measuring: the pass-cost probe",
        "(once per answer, when it first drafts); steps: the rest (plain decode steps).",
        *(table if rows else []),
        *([""] + [f"Scenario phases, {n}." for n in notes] if notes else []),
    ]
