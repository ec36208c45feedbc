"""Summaries of repeated timings: the median is the figure, the spread says how far to trust it."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def summarize(values: list[float]) -> dict:
    """median, min, max, relative spread ((max - min) / median) and every value, for one quantity."""
    if not values:
        return {"median": None, "min": None, "max": None, "spread": None, "values": []}
    median = statistics.median(values)
    spread = (max(values) - min(values)) / median if median else 0.0
    return {
        "median": median,
        "min": min(values),
        "max": max(values),
        "spread": spread,
        "values": list(values),
    }


def time_calls(call: Callable[[], None], warmup: int, runs: int) -> list[float]:
    """Seconds per call of `call` (which must block until its work is done), after warm-up calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times
