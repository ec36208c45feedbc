"""What every runtime's runner provides, and the memory readings the workers share."""

from __future__ import annotations

import resource
import sys
import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class VisionRunner(Protocol):
    """The vision tower (and merger) alone, weights loaded and evaluated."""

    def encode(self, pixels: np.ndarray, grid: np.ndarray) -> None:
        """Run the tower on one preprocessed image and block until the result exists."""

    def reset_peak(self) -> None: ...

    def peak(self) -> MemoryReading: ...


class GenerateRunner(Protocol):
    """The whole model: prompt with one image in, greedy tokens out, never stopping early."""

    def generate(
        self, ids: np.ndarray, pixels: np.ndarray, grid: np.ndarray, tokens: int
    ) -> list[tuple[int, float]]:
        """Exactly `tokens` greedy token ids, each with the `time.perf_counter()` at which the
        runtime had it on the host."""

    def reset_peak(self) -> None: ...

    def peak(self) -> MemoryReading: ...


@dataclass(frozen=True)
class MemoryReading:
    """Peak memory in bytes and how it was measured (the methods differ between runtimes)."""

    bytes: int
    method: str


def process_peak_rss() -> MemoryReading:
    """The process's peak resident set size (monotonic over the process: run sizes ascending)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return MemoryReading(peak * scale, "process peak RSS (getrusage ru_maxrss)")


class RssSampler:
    """Peak resident set size over an interval, sampled every 10 ms on a thread (needs psutil).

    Unlike ru_maxrss it can be reset, so loading (torch builds a randomly initialized tower before
    the checkpoint is copied in) does not count towards the peak of the runs measured after it.
    """

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.stop()
        self._peak, self._stop = self._process.memory_info().rss, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> MemoryReading:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        return MemoryReading(self._peak, "process RSS sampled every 10 ms during the runs (psutil)")

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self._peak = max(self._peak, self._process.memory_info().rss)


def rss_sampler() -> RssSampler | None:
    """An RssSampler where psutil is installed, else None (fall back to `process_peak_rss`)."""
    try:
        return RssSampler()
    except ImportError:
        return None
