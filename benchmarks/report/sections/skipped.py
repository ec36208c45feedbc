"""What the run skipped, and why."""

from __future__ import annotations


def section(report: dict) -> list[str]:
    if not report["skipped"]:
        return []
    return ["", "## Skipped", ""] + [
        f"- {x['runtime']} {x['variant']} ({x['task']}): {x['reason']}" for x in report["skipped"]
    ]
