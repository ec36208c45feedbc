"""The sections of results.md, one module each, in the order they appear; each has
`section(report) -> list[str]` (no lines: the run did not measure it)."""

from __future__ import annotations

from . import (
    bounds,
    floor,
    generation,
    header,
    lookup,
    multiturn,
    ops,
    overhead,
    ranks,
    skipped,
    syncs,
    targets,
    vision,
)

SECTIONS = (
    header,
    vision,
    generation,
    overhead,
    multiturn,
    lookup,
    ranks,
    ops,
    syncs,
    bounds,
    floor,
    targets,
    skipped,
)
