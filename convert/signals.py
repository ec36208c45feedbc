"""SIGTERM and SIGHUP during a conversion unwind it like Ctrl-C, so its cleanup runs, then exit.

Their default action kills the process on the spot, which would leave the half-written hidden folder
behind. While a `TerminationGuard` is active they raise `Terminated` instead: a SystemExit with the
conventional status 128 + the signal number, so `except Exception` lets it pass, every `finally` and
`except BaseException` cleanup runs, and the interpreter exits without a traceback.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(SystemExit):
    """SIGTERM or SIGHUP arrived during a conversion; the exit status is 128 + its number."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class TerminationGuard:
    """While entered, SIGTERM and SIGHUP raise Terminated; inside `held()` they wait for its end.

    Python runs signal handlers in the main thread only, so elsewhere the guard changes nothing (a
    killed run's hidden folder is then removed by the next conversion to the same place). The
    previous handlers are restored on exit.
    """

    def __init__(self) -> None:
        self._previous: dict[int, object] = {}
        self._received: int | None = None
        self._raised = False
        self._holding = 0

    def __enter__(self) -> TerminationGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, kind, error, traceback) -> None:
        for signum, handler in self._previous.items():
            # None: a handler installed outside Python, which cannot be put back; use the default.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if self._received is not None and not isinstance(error, Terminated):
            raise Terminated(self._received)  # it arrived while held and nothing raised it yet

    @contextmanager
    def held(self) -> Iterator[None]:
        """Defer SIGTERM and SIGHUP until the block ends: for steps that must not stop halfway
        (swapping folders, cleaning up)."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
        self._raise_pending()

    def _on_signal(self, signum: int, frame) -> None:
        if self._received is None:
            self._received = signum  # a second signal while unwinding changes nothing
        self._raise_pending()

    def _raise_pending(self) -> None:
        if self._received is not None and not self._raised and not self._holding:
            self._raised = True
            raise Terminated(self._received)
