"""Host syncs: how often a runtime makes the host wait for the device.

On a GPU backend every wait is a pipeline bubble, so the count per vision pass and per decode step
is a proxy, measurable on any backend, for time a Metal or CUDA run loses. Counted while a block
runs: calls of `mx.eval` and `mx.synchronize` and reads of array values (`item`, `tolist`), made by
whichever runtime is measured (the functions of mlx.core are wrapped for the duration).
`mx.async_eval` queues work without waiting and is counted apart.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import mlx.core as mx

BLOCKING = ("eval", "synchronize")
READS = ("item", "tolist")


@contextlib.contextmanager
def count_syncs() -> Iterator[Counter]:
    """Counts, per kind, the host syncs made inside the block (and async_eval calls)."""
    counts: Counter = Counter()
    saved = {name: getattr(mx, name) for name in (*BLOCKING, "async_eval")}
    saved_reads = {name: getattr(mx.array, name) for name in READS}

    def wrap(name, function):
        def counted(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)

        return counted

    try:
        for name, function in saved.items():
            setattr(mx, name, wrap(name, function))
        for name, function in saved_reads.items():
            setattr(mx.array, name, wrap(name, function))
        yield counts
    finally:
        for name, function in saved.items():
            setattr(mx, name, function)
        for name, function in saved_reads.items():
            setattr(mx.array, name, function)


def host_syncs(counts: Counter) -> int:
    """The blocking ones: evaluations, synchronizations and value reads."""
    return sum(counts[name] for name in (*BLOCKING, *READS))
