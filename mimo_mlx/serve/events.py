"""What passes between a request and the generation thread: the `Job`, the events that go back
to the request's asyncio loop (`Started` after the first token, `Delta`s, then `Finished` or
`Failed`), and the errors a job can end with."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ContextFull, MimoError
from ..generation.tool_calls import ToolCall
from .requests import APIError

log = logging.getLogger("mimo_mlx.serve")

# What /health counts: answered, client gone, out of time, refused by the library (a 400),
# internal errors (a 500), refused because the queue was full (a 503).
OUTCOMES = ("completed", "cancelled", "timed_out", "invalid", "failed", "rejected")


@dataclass(frozen=True)
class Started:
    """The first token came; `notices` say what preparing the request's media changed (a
    video fitted to its token budget), for the client."""

    prompt_tokens: int
    cached_tokens: int
    notices: tuple[str, ...] = ()


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


REASONS = {
    "disconnected": "the client went away",
    "timed_out": "its time ran out",
    "shutdown": "the server is shutting down",
}
COUNTED_AS = {"disconnected": "cancelled", "timed_out": "timed_out", "shutdown": "cancelled"}


def finish_job(job: Job) -> None:
    """Run the job's `on_done` (once it is over)."""
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
        "the request waited in the queue past the server's time limit; retry later",
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
        "context; send a shorter conversation, or fewer or smaller images (max_pixels)",
        param="messages",
        code="context_length_exceeded",
    )


def internal_error() -> APIError:
    """The error for a job a bug ended: the details go to the server's log only."""
    return APIError("internal error; see the server log", 500, "server_error")
