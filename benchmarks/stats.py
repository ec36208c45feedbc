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


def pooled(rounds: list):
    """One worker's results from several rounds, each figure summarized over every round's runs
    (lists of per-size results are pooled item by item; anything else is the first round's).
    A round that failed makes the whole result that failure."""
    first = rounds[0]
    if isinstance(first, dict):
        failed = next((r for r in rounds if isinstance(r, dict) and "error" in r), None)
        if failed is not None:
            return failed
        if {"median", "values"} <= first.keys():
            return summarize([v for r in rounds for v in r["values"]])
        return {key: pooled([r[key] for r in rounds]) for key in first}
    if isinstance(first, list) and first and all(isinstance(x, dict) for x in first):
        if all(len(r) == len(first) for r in rounds):
            return [pooled([r[i] for r in rounds]) for i in range(len(first))]
    return first
