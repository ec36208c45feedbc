"""The server's generation loop: one thread owns MLX, requests wait in a bounded queue.

The thread takes jobs in order of arrival. With `max_batch` 1 it generates each alone through the
conversation pool (which reuses the longest cached prefix of any earlier conversation); with more,
up to `max_batch` jobs share every decode step (`serve.batching`), each still continuing the best
cached conversation, and each gets the answer it would get alone (token for token when greedy,
see `generation.batch`). A full queue refuses a request at once. Between two steps the thread
checks whether a job was cancelled (its client went away) and whether its time is up, so either
stops that job within one step, the others going on; a request whose time ran out ends with
finish_reason "length". Events go back to the job's asyncio loop (`serve.events`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable

from ..conversation.pool import ConversationPool
from ..errors import MimoError
from ..generation.loop import DEFAULT_PREFILL_STEP
from ..inputs.tokenizer import Tokenizer
from .answers import JobAnswer
from .events import (
    COUNTED_AS,
    OUTCOMES,
    REASONS,
    Failed,
    Finished,
    Job,
    client_error,
    finish_job,
    internal_error,
    queue_timeout,
    shutting_down,
)
from .requests import APIError

log = logging.getLogger("mimo_mlx.serve")

DEFAULT_MAX_BATCH = 4


class Reservation:
    """A place in the queue, taken before a request's media are read (`Engine.reserve`)."""

    held = True


class Engine:
    """The generation thread and its bounded queue; `stats()` for /health.

    A request takes its place in the queue (`reserve`) as soon as it is parsed, before its media
    are read or any of its work is done: once `max_batch` jobs run and `queue_size` wait (or read
    their media), the next answers 503 at once, whatever it holds. `submit` then queues the job
    in that place; `release` gives it back on an error.

    `max_batch` jobs run at once (1: one at a time, through `pool.stream`; more: batched, through
    `pool.begin` and `pool.end`); `queue_size` more may wait. `prefill_step_size` is the chunk
    of prompt a batched step prefills between two decode steps of the running jobs."""

    def __init__(
        self,
        pool: ConversationPool,
        tokenizer: Tokenizer,
        queue_size: int,
        max_batch: int = 1,
        prefill_step_size: int = DEFAULT_PREFILL_STEP,
    ) -> None:
        if max_batch < 1:
            raise MimoError(f"max_batch must be at least 1, got {max_batch}")
        self.pool, self.tokenizer, self.queue_size = pool, tokenizer, queue_size
        self.max_batch, self.prefill_step_size = max_batch, prefill_step_size
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._reserved = 0  # places taken by requests still reading their media
        self._cond = threading.Condition()
        self._closed = False
        self._admit: Callable[[Job], None] | None = None  # a batching loop's: see `admit_with`
        self.counts: Counter[str] = Counter()
        self.peak_memory = 0.0  # GB, the most any step needed
        self.batch_bytes = 0  # what the running batch's cache holds
        self._thread = threading.Thread(target=self._run, name="mimo-mlx-generation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Refuse new jobs and end the others: waiting ones at once, running ones at their next
        step, each answered 503 (the server is shutting down). Does not wait."""
        with self._cond:
            self._closed = True
            for job in list(self._waiting):
                self._drop(job, "shutdown")
            for job in self._running:
                job.cancelled = job.cancelled or "shutdown"
            self._cond.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        """`stop`, then wait for the generation thread to finish."""
        self.stop()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def reserve(self) -> Reservation:
        """A place in the queue; APIError 503 at once when none is left or the server is
        stopping."""
        with self._cond:
            if self._closed:
                raise shutting_down()
            # Places in the batch not taken yet hold requests too: they start at once.
            free = max(0, self.max_batch - len(self._running))
            if len(self._waiting) + self._reserved >= self.queue_size + free:
                self.counts["rejected"] += 1
                raise APIError(
                    f"the server is busy: {len(self._running)} requests are generating and "
                    f"{len(self._waiting) + self._reserved} already waiting (it generates "
                    f"{self.max_batch} at once and queues {self.queue_size} more); retry later",
                    503,
                    "server_error",
                    code="server_overloaded",
                )
            self._reserved += 1
            return Reservation()

    def release(self, reservation: Reservation) -> None:
        """Give a place back unused (the request failed before it was queued)."""
        with self._cond:
            if reservation.held:
                reservation.held = False
                self._reserved -= 1

    def submit(self, job: Job, reservation: Reservation | None = None) -> None:
        """Queue a job, in its reserved place or a new one (APIError 503 if none is left)."""
        reservation = reservation if reservation is not None else self.reserve()
        with self._cond:
            if not reservation.held:
                raise ValueError("this place in the queue was already used or given back")
            reservation.held = False
            self._reserved -= 1
            if self._closed:
                raise shutting_down()
            self._waiting.append(job)
            self._cond.notify()
        self._admit_waiting()

    def cancel(self, job: Job) -> None:
        """The job's client went away: a waiting job leaves the queue, a running one stops at
        its next step; a finished one is left alone."""
        with self._cond:
            if job.state == "queued":
                self._drop(job, "disconnected")
            elif job.state == "running" and job.cancelled is None:
                job.cancelled = "disconnected"
                self._cond.notify()

    def expire(self, job: Job) -> bool:
        """The job's time ran out: True if it was still waiting (it leaves the queue); a
        running job is ended by the generation thread at its next step."""
        with self._cond:
            if job.state != "queued":
                return False
            self._drop(job, "timed_out")
            return True

    def stats(self) -> dict:
        with self._cond:
            return {
                "queue": {
                    "waiting": len(self._waiting),
                    "reading": self._reserved,
                    "running": len(self._running),
                    "capacity": self.queue_size,
                    "max_batch": self.max_batch,
                },
                "requests": {name: self.counts[name] for name in OUTCOMES},
                "cache": self.pool.stats(),
                "batch_bytes": self.batch_bytes,
                "peak_memory_gb": self.peak_memory,
            }

    # ------------------------------------------------------------ the generation thread

    def _drop(self, job: Job, reason: str) -> None:
        # With the lock held: a job that never ran.
        self._waiting.remove(job)
        job.state = "done"
        self.counts[COUNTED_AS[reason]] += 1
        log.info("%s: %s while it waited in the queue", job.id, REASONS[reason])
        if reason == "shutdown":
            job.emit(Failed(shutting_down()))
        finish_job(job)

    def admit_with(self, admit: Callable[[Job], None] | None) -> None:
        """Batched: from now on each job starts as soon as the batch has room for it, on the
        thread that queued it or made the room (`admit(job)`: an asyncio request's, or the
        generation thread's), rather than when the generation thread ends its current step: a
        request's media are prepared while the running ones decode. None: back to `take`."""
        self._admit = admit
        self._admit_waiting()

    def wait_for(self, ready: Callable[[], bool], timeout: float | None = None) -> None:
        """For the generation thread: until `ready()`, the engine closes, or `timeout` s."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or ready(), timeout)

    def wake(self) -> None:
        """Wake the generation thread from `wait_for`."""
        with self._cond:
            self._cond.notify_all()

    def _admit_waiting(self) -> None:
        """Start waiting jobs while the batch has room (with `admit_with`)."""
        admit = self._admit
        if admit is None:
            return
        started = []
        with self._cond:
            while not self._closed and self._waiting and len(self._running) < self.max_batch:
                job = self._waiting.popleft()
                job.state = "running"
                self._running.append(job)
                started.append(job)
        for job in started:
            admit(job)

    def take(self) -> Job | None:
        """For the generation thread serving one job at a time: the next job, once one waits;
        None when the engine has closed. (A batching loop is given its jobs: `admit_with`.)"""
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            job = self._waiting.popleft()
            job.state = "running"
            self._running.append(job)
            return job

    @property
    def closed(self) -> bool:
        return self._closed

    def done(self, job: Job, outcome: str, last_event: Finished | Failed | None) -> None:
        """For the generation thread: a job is over; counted before its client hears, so /health
        agrees with it."""
        with self._cond:
            self.counts[outcome] += 1
            job.state = "done"
            self._running.remove(job)
        if last_event is not None:
            job.emit(last_event)
        finish_job(job)
        self._admit_waiting()  # its place in the batch is free

    def _run(self) -> None:
        if self.max_batch > 1:
            from .batching import BatchLoop  # noqa: PLC0415  (only a batching server needs it)

            BatchLoop(self).run()
            return
        while (job := self.take()) is not None:
            try:
                outcome, last_event = self._generate(job)
            except Exception:  # a bug must cost one request, never the server
                log.exception("%s: generation failed", job.id)
                outcome, last_event = "failed", Failed(internal_error())
            self.done(job, outcome, last_event)

    def _generate(self, job: Job) -> tuple[str, Finished | Failed | None]:
        """Run one job alone: its outcome for the counts and its last event."""
        if time.monotonic() >= job.deadline:
            log.info("%s: its time ran out while it waited in the queue", job.id)
            return "timed_out", Failed(queue_timeout())
        if job.prompt is not None:
            stream = self.pool.stream_text(job.prompt, **job.options)
        else:
            stream = self.pool.stream(job.messages, **job.options)
        answer: JobAnswer | None = None
        try:
            for response in stream:
                if answer is None:  # the pool knows how the prompt ends once it has answered
                    notices = self.pool.notices  # e.g. a video fitted to its budget
                    answer = JobAnswer(job, self.tokenizer, self.pool.opens_thinking, notices)
                self.peak_memory = max(self.peak_memory, response.peak_memory)
                if answer.add(response):
                    break
        except MimoError as err:
            log.info("%s: refused: %s", job.id, err)
            return "invalid", Failed(client_error(err, job.scrub))
        finally:
            stream.close()  # the pool keeps the answer as far as it got
        if answer is None:
            if job.cancelled:
                gone = job.cancelled == "disconnected"
                return COUNTED_AS[job.cancelled], None if gone else Failed(shutting_down())
            raise RuntimeError("the pool's stream ended without an answer")
        return answer.end()
