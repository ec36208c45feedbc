"""One request's answer as the generation thread builds it: what each response becomes for the
client (`Started`, `Delta`s), when the answer is over, and how it ends (`Finished`, or nothing for
a client that went away). The one-at-a-time loop and the batched loop both feed it."""

from __future__ import annotations

import logging
import time

import numpy as np

from ..generation.answer_stream import AnswerStream
from ..generation.loop import GenerationResponse
from ..generation.tool_calls import ToolCallStream
from ..inputs.tokenizer import Tokenizer
from .events import COUNTED_AS, REASONS, Delta, Failed, Finished, Job, Started, shutting_down
from .responses import logprob_entry, timings_body, usage_body

log = logging.getLogger("mimo_mlx.serve")


class JobAnswer:
    """A running job's answer: `add` each response, then `end` once."""

    def __init__(
        self, job: Job, tokenizer: Tokenizer, opens_thinking: bool, notices: tuple[str, ...] = ()
    ) -> None:
        """`notices`: what the pool changed in the request (a video fitted to its budget), for
        the log and (without temporary file names) the client."""
        self.job, self.tokenizer = job, tokenizer
        self.notices = tuple(notices)
        self.stream = AnswerStream(job.stop, opens_thinking, raw=job.prompt is not None)
        self.calls = (
            None if job.tool_names is None else ToolCallStream(job.tool_names, job.max_calls)
        )
        self.started = False
        self.last: GenerationResponse | None = None
        self.finish = "length"
        self.first_at = self.last_at = 0.0

    def add(self, response: GenerationResponse) -> bool:
        """Take the job's next response; True when the answer is over (nothing more wanted):
        its client went away, a stop string or the one tool call allowed came, the model
        finished, or the job's time ran out."""
        job = self.job
        if not self.started:
            self.started, self.first_at = True, time.perf_counter()
            for notice in self.notices:
                log.info("%s: %s", job.id, notice)
            notices = tuple(job.scrub(notice) for notice in self.notices)
            job.emit(Started(response.prompt_tokens, response.cached_tokens, notices))
        if job.cancelled:
            return True
        self.last, self.last_at = response, time.perf_counter()
        reasoning, content = self.stream.feed(response.text)
        content, called = self.calls.feed(content) if self.calls else (content, [])
        entries = self._logprobs(response, job.top_logprobs)
        if reasoning or content or entries or called:
            job.emit(Delta(reasoning, content, entries, tuple(called)))
        if self.calls and self.calls.done:  # parallel_tool_calls false: one call, then the end
            self.finish = "stop"
            return True
        if self.stream.stopped or response.finish_reason:
            self.finish = "stop" if self.stream.stopped else response.finish_reason
            return True
        return time.monotonic() >= job.deadline  # finish_reason "length", as for max_tokens

    def end(self) -> tuple[str, Finished | Failed | None]:
        """The job's outcome for the counts, and its last event (None: no one listens)."""
        job, last = self.job, self.last
        if job.cancelled:
            done = last.generation_tokens if last else 0
            log.info("%s: %s; stopped after %d tokens", job.id, REASONS[job.cancelled], done)
            gone = job.cancelled == "disconnected"
            return COUNTED_AS[job.cancelled], None if gone else Failed(shutting_down())
        finish = self.finish
        reasoning, content = self.stream.finish()
        called = []
        if self.calls:
            content, called = self.calls.feed(content)
            content += self.calls.finish()
            if self.calls.calls and finish == "stop":
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
        return outcome, self._finished(finish, self.last_at - self.first_at)

    def _finished(self, finish: str, decode_s: float) -> Finished:
        last = self.last
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
        # Read on the host: an MLX op on them would wait for the step queued since.
        logprobs = np.asarray(response.logprobs).reshape(-1)
        best = []
        if top:
            ids = np.argpartition(-logprobs, top - 1)[:top]
            pairs = sorted(zip(logprobs[ids].tolist(), ids.tolist(), strict=True), reverse=True)
            best = [(*self._token(i), value) for value, i in pairs]
        chosen = float(logprobs[response.token])
        return [logprob_entry(*self._token(response.token), chosen, best)]

    def _token(self, token_id: int) -> tuple[str, bytes]:
        """A token's text as it decodes alone, and its real bytes (part of a character, maybe)."""
        return self.tokenizer.decode([token_id]), self.tokenizer.token_bytes(token_id)
