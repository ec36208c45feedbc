"""results.json (everything, to reproduce) and results.md (tables, targets); chart.py draws the PNG.

The report is a package: `targets` judges a run, `kernel_floor` models what the backend's kernels
alone need for a vision pass, `bandwidth` what a decode step reads against the measured copy
bandwidth, and `sections/` renders results.md one section per module.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..chart import chart
from .bandwidth import decode_bandwidth
from .kernel_floor import floors
from .sections import SECTIONS
from .targets import targets


def markdown(report: dict) -> str:
    """The human-readable report: setup, one table per measurement, targets, what was skipped."""
    return "\n".join(line for s in SECTIONS for line in s.section(report)) + "\n"


def write_report(report: dict, out: Path) -> list[Path]:
    """Write results.json, results.md and (with matplotlib) results.png into `out`."""
    report = {
        **report,
        "vision_kernel_floor": floors(report),
        "decode_bandwidth": decode_bandwidth(report),
        "targets": targets(report),
    }
    paths = [out / "results.json", out / "results.md"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(markdown(report))
    drawn = report["results"]["vision"] or report["results"]["generate"]
    if drawn and chart(report, out / "results.png"):
        paths.append(out / "results.png")
    return paths
