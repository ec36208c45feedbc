"""Several processes as one model: MLX's distributed group, and a watchdog that stops them together.

`mlx.launch` (ring over TCP or Thunderbolt, JACCL, MPI, NCCL) starts one process per rank; each calls
`start_group` to join. The model's traffic is MLX's own collectives; this module adds what a user
needs around them:

- A rank whose process dies closes its sockets: the others' next collective raises a backend error,
  which `Group.errors` turns into one `MimoError` line.
- A rank whose host vanishes (sleep, cable, Wi-Fi) closes nothing, and MLX's collectives wait for
  it forever. A watchdog thread ends this process with one line when a wait on the group makes no
  progress for `timeout` seconds; its closed sockets then stop the ranks still connected to it.
- `mlx.launch` ends the other ranks with SIGTERM when one fails; they say so in one line (and so
  does Ctrl-C), even while a collective holds the main thread.

    group = start_group(timeout=300)          # every rank
    with group.waiting("to load"):            # armed: no progress for 300 s ends the process
        ...
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from ..errors import MimoError
from ..options import DEFAULT_GROUP_TIMEOUT

# Set by the launchers for a process that is one rank of several: mlx.launch (ring, JACCL, NCCL
# set MLX_RANK) and mpirun (Open MPI, MPICH).
_LAUNCH_RANK = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
_BACKEND_ERROR = re.compile(r"^\[(ring|jaccl|mpi|nccl)\]")
_EXIT_STATUS = 1


def launched() -> bool:
    """Whether a launcher started this process as one rank of a group of several."""
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if name in os.environ:
            return os.environ[name].strip() not in ("", "1")
    if "MLX_RANK" not in os.environ:
        return False
    # `mlx.launch -n 1` (ring) hands its one rank an empty hostfile: a group of one.
    hostfile = os.environ.get("MLX_HOSTFILE")
    return not (hostfile is not None and _empty_file(hostfile))


def _empty_file(path: str) -> bool:
    try:
        return not Path(path).read_text().strip()
    except OSError:
        return False


def launch_rank() -> int | None:
    """This process's rank as the launcher set it (None when not launched)."""
    for name in _LAUNCH_RANK:
        if name in os.environ:
            try:
                return int(os.environ[name])
            except ValueError:
                return None
    return None


def report_and_exit(message: str, status: int = _EXIT_STATUS) -> None:
    """Write one line to stderr and end the process at once, whatever the main thread is doing
    (a thread cannot interrupt a collective that waits forever)."""
    with contextlib.suppress(Exception):  # the answer so far, then the reason it stops
        sys.stdout.flush()
    os.write(2, f"error: {message}\n".encode())
    os._exit(status)


class Watchdog:
    """A thread that calls `on_expire(message)` when an armed wait sees no progress for `timeout` s.

    `waiting(what)` arms it for a block (nested blocks restore the outer one); `progress()` restarts
    the clock. Unarmed, it never fires: a rank may idle as long as it likes between requests.
    """

    def __init__(
        self,
        timeout: float,
        label: Callable[[], str],
        on_expire: Callable[[str], None] = report_and_exit,
    ) -> None:
        if not timeout > 0:
            raise MimoError(
                f"the group timeout must be a positive number of seconds, got {timeout}"
            )
        self.timeout = timeout
        self._label = label
        self._on_expire = on_expire
        self._armed: list[str] = []  # what each armed block waits for, innermost last
        self._deadline: float | None = None
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._watch, name="mimo-mlx-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        with self._wake:
            self._armed.append(what)
            self._deadline = time.monotonic() + self.timeout
            self._wake.notify()
        try:
            yield
        finally:
            with self._wake:
                self._armed.pop()
                self._deadline = time.monotonic() + self.timeout if self._armed else None
                self._wake.notify()

    def progress(self) -> None:
        with self._wake:
            if self._armed:
                self._deadline = time.monotonic() + self.timeout

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join()

    def _watch(self) -> None:
        with self._wake:
            while not self._stopped:
                if self._deadline is None:
                    self._wake.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._wake.wait(left)
                    continue
                what, self._deadline = self._armed[-1], None
                self._on_expire(
                    f"{self._label()}: waited {self.timeout:.0f} s {what} with no progress: another "
                    "rank has stopped or its host cannot be reached, so every rank stops. Check that "
                    "every host is up and reachable; if one step of this prompt really takes that "
                    "long, give a larger --group-timeout."
                )


@dataclass
class Group:
    """The processes one model runs across: MLX's group, and the watchdog around waits on it."""

    mx_group: mx.distributed.Group
    watchdog: Watchdog
    _closed: bool = field(default=False, repr=False)

    @property
    def rank(self) -> int:
        return self.mx_group.rank()

    @property
    def size(self) -> int:
        return self.mx_group.size()

    @property
    def label(self) -> str:
        return f"rank {self.rank} of {self.size}"

    def waiting(self, what: str) -> contextlib.AbstractContextManager[None]:
        """Arm the watchdog while the block waits on the other ranks (see `Watchdog.waiting`)."""
        return self.watchdog.waiting(what)

    def progress(self) -> None:
        self.watchdog.progress()

    def barrier(self, what: str) -> None:
        """Return once every rank got here (a one-number all_sum), under the watchdog."""
        with self.waiting(what), self.errors():
            mx.eval(mx.distributed.all_sum(mx.array(1.0), group=self.mx_group, stream=mx.cpu))

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """A backend's lost-connection error (another rank's process ended) -> one MimoError."""
        try:
            yield
        except RuntimeError as err:
            if not _BACKEND_ERROR.match(str(err)):
                raise
            raise MimoError(
                f"{self.label}: lost the connection to another rank ({err}): a rank stopped or "
                "its host went away, so every rank stops. An earlier message from that rank, if "
                "any, says why."
            ) from None

    @contextlib.contextmanager
    def labelled(self) -> Iterator[None]:
        """Errors of this rank say which rank they come from (every rank's stderr is merged)."""
        try:
            yield
        except MimoError as err:
            if str(err).startswith(self.label):
                raise
            raise MimoError(f"{self.label}: {err}") from None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.watchdog.stop()


def start_group(
    timeout: float = DEFAULT_GROUP_TIMEOUT, backend: str = "any", handle_signals: bool = True
) -> Group:
    """Join the group the launcher set up for this process (under the watchdog: a rank that never
    shows up ends this one too). With `handle_signals` (main thread only), SIGTERM and SIGHUP (the
    launcher ends the other ranks so when one fails) and Ctrl-C end this rank at once with one
    line, even mid-collective; a program with its own signal handling (an asyncio server) passes
    False."""
    rank = launch_rank()
    state: dict[str, Group] = {}

    def label() -> str:
        return state["group"].label if "group" in state else f"rank {rank}"

    watchdog = Watchdog(timeout, label)
    try:
        with watchdog.waiting("for the other ranks to join"):
            mx_group = mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as err:
        watchdog.stop()
        raise MimoError(
            f"rank {rank}: could not join the group ({err}). Check that every host in the "
            "hostfile is up and reachable at the address given, and that the same command "
            "runs on every rank."
        ) from None
    group = state["group"] = Group(mx_group, watchdog)
    if handle_signals and threading.current_thread() is threading.main_thread():
        _watch_signals(group)
    return group


_SIGNALS = {signal.SIGTERM: "stopped by SIGTERM", signal.SIGHUP: "stopped by SIGHUP"}
_SIGNALS[signal.SIGINT] = "interrupted"


def _watch_signals(group: Group) -> None:
    """End this rank with one line on SIGTERM, SIGHUP or Ctrl-C, even in the middle of a collective.

    A Python signal handler runs only when the main thread returns to the interpreter, which a
    collective whose peer is gone may never do. Python's C-level handler also writes the signal
    number to the wakeup fd, whichever thread it interrupts: a thread reading that pipe acts at once.
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    for number in _SIGNALS:
        signal.signal(number, lambda *_: None)
    signal.set_wakeup_fd(write_fd)

    def watch() -> None:
        while data := os.read(read_fd, 1):
            number = signal.Signals(data[0])
            if number == signal.SIGINT:
                report_and_exit(f"{group.label}: interrupted", 130)
            if number in _SIGNALS:
                report_and_exit(
                    f"{group.label}: {_SIGNALS[number]} (mlx.launch stops every rank when one "
                    "fails; that rank's message says why)",
                    128 + number,
                )

    threading.Thread(target=watch, name="mimo-mlx-signals", daemon=True).start()
