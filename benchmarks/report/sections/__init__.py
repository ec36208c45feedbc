"""The sections of results.md, one module each, in the order they appear; each has
`section(report) -> list[str]` (no lines: the run did not measure it)."""

from __future__ import annotations

from . import (
    bounds,
    decode,
    floor,
    generation,
    header,
    lookup,
    lookup_time,
    multiturn,
    ops,
    overhead,
    pass_cost,
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
    decode,
    multiturn,
    lookup,
    lookup_time,
    pass_cost,
    ranks,
    ops,
    syncs,
    bounds,
    floor,
    targets,
    skipped,
)
