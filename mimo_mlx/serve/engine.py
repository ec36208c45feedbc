"""The server's generation loop: one thread owns MLX, requests wait in a bounded queue.

The thread takes jobs in order of arrival and generates each alone through the conversation pool
(which reuses the longest cached prefix of any earlier conversation), so every client gets the
answer it would get alone, token for token when greedy. A full queue refuses a request at once.
Between two tokens the thread checks whether the job was cancelled (its client went away) and
whether the request's time is up, so either stops generation within one decode step; a request
whose time ran out ends with finish_reason "length". Events go back to the job's asyncio loop:
`Started` after the first token (the prompt was accepted), `Delta`s, then `Finished` or `Failed`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from ..conversation.pool import ConversationPool
from ..errors import ContextFull, MimoError
from ..generation.answer_stream import AnswerStream
from ..generation.loop import GenerationResponse
from ..generation.tool_calls import ToolCall, ToolCallStream
from ..inputs.tokenizer import Tokenizer
from .requests import APIError
from .responses import logprob_entry, timings_body, usage_body

log = logging.getLogger("mimo_mlx.serve")

# What /health counts: answered, client gone, out of time, refused by the library (a 400),
# internal errors (a 500), refused because the queue was full (a 503).
OUTCOMES = ("completed", "cancelled", "timed_out", "invalid", "failed", "rejected")


@dataclass(frozen=True)
class Started:
    prompt_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class Delta:
    reasoning: str
    content: str
    logprobs: list[dict] | None = None
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class Finished:
    finish_reason: str
    usage: dict
    timings: dict


@dataclass(frozen=True)
class Failed:
    error: APIError


@dataclass(eq=False)
class Job:
    """One request for the generation thread, and the way its events get back to asyncio.

    `options` go to `ConversationPool.stream` (max_tokens, sampling and prompt options), or
    with a `prompt` (a plain text completion, no chat template) to `stream_text`;
    `deadline` is on `time.monotonic()`; `top_logprobs` None means no log-probabilities.
    `on_done` runs once when the job is over (it removes temporary media files); `scrub` takes
    what a client must not read (temporary paths) out of an error message. With `tool_names`,
    calls to those tools are taken out of the answer (`max_calls`: then it ends).
    """

    id: str
    messages: list[dict]
    options: dict[str, Any]
    deadline: float
    loop: asyncio.AbstractEventLoop
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None
    on_done: Callable[[], None] | None = None
    tool_names: tuple[str, ...] | None = None
    max_calls: int | None = None
    prompt: str | None = None
    scrub: Callable[[str], str] = str
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    state: str = "queued"  # queued -> running -> done
    cancelled: str | None = None  # why it was cancelled, read by the generation thread

    def emit(self, event: Started | Delta | Finished | Failed) -> None:
        """Hand an event to the request's loop (from any thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass


class Reservation:
    """A place in the queue, taken before a request's media are read (`Engine.reserve`)."""

    held = True


class Engine:
    """The generation thread and its bounded queue; `stats()` for /health.

    A request takes its place in the queue (`reserve`) as soon as it is parsed, before its media
    are read or any of its work is done: a full queue answers 503 at once, whatever the request
    holds. `submit` then queues the job in that place; `release` gives it back on an error."""

    def __init__(self, pool: ConversationPool, tokenizer: Tokenizer, queue_size: int) -> None:
        self.pool, self.tokenizer, self.queue_size = pool, tokenizer, queue_size
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._reserved = 0  # places taken by requests still reading their media
        self._cond = threading.Condition()
        self._closed = False
        self.counts: Counter[str] = Counter()
        self.peak_memory = 0.0  # GB, the most any request needed
        self._thread = threading.Thread(target=self._run, name="mimo-mlx-generation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Refuse new jobs and end the others: waiting ones at once, the running one at its next
        token, each answered 503 (the server is shutting down). Does not wait."""
        with self._cond:
            self._closed = True
            for job in list(self._waiting):
                self._drop(job, "shutdown")
            if self._running is not None:
                self._running.cancelled = "shutdown"
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
            if len(self._waiting) + self._reserved >= self.queue_size:
                self.counts["rejected"] += 1
                raise APIError(
                    f"the server is busy: {len(self._waiting) + self._reserved} requests are "
                    f"already waiting (--queue-size {self.queue_size}); retry later",
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

    def cancel(self, job: Job) -> None:
        """The job's client went away: a waiting job leaves the queue, a running one stops at
        its next token; a finished one is left alone."""
        with self._cond:
            if job.state == "queued":
                self._drop(job, "disconnected")
            elif job.state == "running" and job.cancelled is None:
                job.cancelled = "disconnected"

    def expire(self, job: Job) -> bool:
        """The job's time ran out: True if it was still waiting (it leaves the queue); a
        running job is ended by the generation thread at its next token."""
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
                    "running": int(self._running is not None),
                    "capacity": self.queue_size,
                },
                "requests": {name: self.counts[name] for name in OUTCOMES},
                "cache": self.pool.stats(),
                "peak_memory_gb": self.peak_memory,
            }

    # ------------------------------------------------------------ the generation thread

    def _drop(self, job: Job, reason: str) -> None:
        # With the lock held: a job that never ran.
        self._waiting.remove(job)
        job.state = "done"
        self.counts[_COUNTED_AS[reason]] += 1
        log.info("%s: %s while it waited in the queue", job.id, _REASONS[reason])
        if reason == "shutdown":
            job.emit(Failed(shutting_down()))
        _finish(job)

    def _next(self) -> Job | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            job = self._running = self._waiting.popleft()
            job.state = "running"
            return job

    def _run(self) -> None:
        while (job := self._next()) is not None:
            try:
                outcome, last_event = self._generate(job)
            except Exception:  # a bug must cost one request, never the server
                log.exception("%s: generation failed", job.id)
                outcome = "failed"
                last_event = Failed(
                    APIError("internal error; see the server log", 500, "server_error")
                )
            with self._cond:  # counted before the client hears, so /health agrees with it
                self.counts[outcome] += 1
                job.state, self._running = "done", None
            if last_event is not None:
                job.emit(last_event)
            _finish(job)

    def _generate(self, job: Job) -> tuple[str, Finished | Failed | None]:
        """Run one job: its outcome for the counts and its last event (None: no one listens)."""
        if time.monotonic() >= job.deadline:
            log.info("%s: its time ran out while it waited in the queue", job.id)
            return "timed_out", Failed(queue_timeout())
        if job.prompt is not None:
            stream = self.pool.stream_text(job.prompt, **job.options)
        else:
            stream = self.pool.stream(job.messages, **job.options)
        answer: AnswerStream | None = None
        calls = None if job.tool_names is None else ToolCallStream(job.tool_names, job.max_calls)
        last: GenerationResponse | None = None
        finish, first_at, last_at = "length", 0.0, 0.0
        try:
            for response in stream:
                if answer is None:
                    raw = job.prompt is not None
                    answer = AnswerStream(job.stop, self.pool.opens_thinking, raw=raw)
                    for notice in self.pool.notices:  # e.g. a video fitted to its budget
                        log.info("%s: %s", job.id, notice)
                    first_at = time.perf_counter()
                    job.emit(Started(response.prompt_tokens, response.cached_tokens))
                if job.cancelled:
                    break
                last, last_at = response, time.perf_counter()
                self.peak_memory = max(self.peak_memory, response.peak_memory)
                reasoning, content = answer.feed(response.text)
                content, called = calls.feed(content) if calls else (content, [])
                entries = self._logprobs(response, job.top_logprobs)
                if reasoning or content or entries or called:
                    job.emit(Delta(reasoning, content, entries, tuple(called)))
                if calls and calls.done:  # parallel_tool_calls false: one call, then the end
                    finish = "stop"
                    break
                if answer.stopped or response.finish_reason:
                    finish = "stop" if answer.stopped else response.finish_reason
                    break
                if time.monotonic() >= job.deadline:
                    break  # finish_reason "length", as when max_tokens runs out
        except MimoError as err:
            log.info("%s: refused: %s", job.id, err)
            return "invalid", Failed(client_error(err, job.scrub))
        finally:
            stream.close()  # the pool keeps the answer as far as it got
        if job.cancelled:
            done = last.generation_tokens if last else 0
            log.info("%s: %s; stopped after %d tokens", job.id, _REASONS[job.cancelled], done)
            gone = job.cancelled == "disconnected"
            return _COUNTED_AS[job.cancelled], None if gone else Failed(shutting_down())
        reasoning, content = answer.finish()
        called = []
        if calls:
            content, called = calls.feed(content)
            content += calls.finish()
            if calls.calls and finish == "stop":
                finish = "tool_calls"
        if reasoning or content or called:
            job.emit(Delta(reasoning, content, tool_calls=tuple(called)))
        timed_out = finish == "length" and time.monotonic() >= job.deadline
        log.info(
            "%s: %d prompt tokens (%d cached), %d generated, finish %s%s",
            job.id,
            last.prompt_tokens,
            last.cached_tokens,
            last.generation_tokens,
            finish,
            " (time limit)" if timed_out else "",
        )
        outcome = "timed_out" if timed_out else "completed"
        return outcome, self._finished(last, finish, last_at - first_at)

    def _finished(self, last: GenerationResponse, finish: str, decode_s: float) -> Finished:
        computed = last.prompt_tokens - last.cached_tokens
        return Finished(
            finish,
            usage_body(last.prompt_tokens, last.generation_tokens, last.cached_tokens),
            timings_body(
                computed,
                last.time_to_first_token,
                last.generation_tokens,
                decode_s,
                last.cached_tokens,
            ),
        )

    def _logprobs(self, response: GenerationResponse, top: int | None) -> list[dict] | None:
        """The token's log-probability (and the `top` most likely), as OpenAI lists them; none
        for end tokens, which are not part of the answer."""
        if top is None or response.token in self.tokenizer.eos_token_ids:
            return None
        logprobs = response.logprobs
        best = []
        if top:
            ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
            pairs = sorted(zip(logprobs[ids].tolist(), ids.tolist(), strict=True), reverse=True)
            best = [(*self._token(i), value) for value, i in pairs]
        chosen = logprobs[response.token].item()
        return [logprob_entry(*self._token(response.token), chosen, best)]

    def _token(self, token_id: int) -> tuple[str, bytes]:
        """A token's text as it decodes alone, and its real bytes (part of a character, maybe)."""
        return self.tokenizer.decode([token_id]), self.tokenizer.token_bytes(token_id)


_REASONS = {
    "disconnected": "the client went away",
    "timed_out": "its time ran out",
    "shutdown": "the server is shutting down",
}
_COUNTED_AS = {"disconnected": "cancelled", "timed_out": "timed_out", "shutdown": "cancelled"}


def _finish(job: Job) -> None:
    if job.on_done is not None:
        try:
            job.on_done()
        except Exception:
            log.exception("%s: cleaning up failed", job.id)


def shutting_down() -> APIError:
    return APIError("the server is shutting down", 503, "server_error", code="shutting_down")


def queue_timeout() -> APIError:
    """The error for a request whose time ran out before its generation started."""
    return APIError(
        "the request waited in the queue past the server's time limit (--request-timeout); "
        "retry later",
        503,
        "server_error",
        code="timeout",
    )


def client_error(err: MimoError, scrub: Callable[[str], str] = str) -> APIError:
    """A library error caused by the request, as a 400; a prompt past the context says so.
    `scrub` takes server-side details (temporary paths) out of the message."""
    if isinstance(err, ContextFull):
        return context_exceeded(err.tokens, err.limit)
    return APIError(scrub(str(err)), param="messages")


def context_exceeded(tokens: int, limit: int) -> APIError:
    return APIError(
        f"the prompt is at least {tokens} tokens, but at most {limit} fit in this server's "
        "context (the model's, or --max-kv-size); send a shorter conversation, or fewer or "
        "smaller images (max_pixels)",
        param="messages",
        code="context_length_exceeded",
    )
