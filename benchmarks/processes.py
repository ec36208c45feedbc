"""Worker processes, each with a time limit, and how each one ended.

A worker that crashes (an exit status, or a signal such as SIGFPE or SIGSEGV) or outlives its
limit is recorded as such and the run goes on. At the limit the worker's whole process group is
killed (SIGKILL: a process stuck in a device call answers nothing gentler), so a stuck runtime
cannot hold the device, or the run, any longer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Ending:
    """How a worker process ended: its exit status (negative: the signal that killed it, as
    Python reports it), whether it was killed at its time limit, and how long it ran."""

    exit_code: int
    timed_out: bool
    seconds: float
    limit_s: float | None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    @property
    def signal(self) -> str | None:
        """The name of the signal that ended it (None: it exited)."""
        if self.exit_code >= 0:
            return None
        try:
            return signal.Signals(-self.exit_code).name
        except ValueError:
            return f"signal {-self.exit_code}"

    def describe(self) -> str:
        if self.timed_out:
            return f"timed out: killed at its {self.limit_s:.0f} s limit"
        if self.signal:
            return f"killed by {self.signal}"
        return f"exit {self.exit_code}"

    def record(self) -> dict:
        return {
            "error": self.describe(),
            "exit_code": self.exit_code,
            "signal": self.signal,
            "timed_out": self.timed_out,
            "seconds": self.seconds,
            "limit_s": self.limit_s,
        }


def run_process(
    command: list[str], log: Path, cwd: Path, env: dict, limit_s: float | None
) -> Ending:
    """Run `command` with stdout and stderr into `log`, killed with its process group after
    `limit_s` seconds (None: no limit)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        timed_out = False
        try:
            code = process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            code = _kill(process)
        except BaseException:  # Ctrl-C in the driver: leave no worker behind
            _kill(process)
            raise
    return Ending(code, timed_out, time.perf_counter() - start, limit_s)


def _kill(process: subprocess.Popen) -> int:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # its own group (start_new_session): only ours
    except ProcessLookupError:
        pass
    return process.wait()
