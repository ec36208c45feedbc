"""Targets: each one, what was measured, whether it was met."""

from __future__ import annotations

from ..targets import targets


def section(report: dict) -> list[str]:
    found = targets(report)
    if not found:
        return []
    lines = ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in found:
        met = {True: "yes", False: "no", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    return lines
