"""The server's batched loop: up to `max_batch` requests share every decode step.

Each job takes the cached conversation that shares the longest prefix with it out of the pool
(`ConversationPool.begin`), joins a `BatchGenerator` and gives the conversation back, answer
included, when it ends (`ConversationPool.end`), so a later request reuses it (`cached_tokens`). A
conversation in use is not continued by another request until it is back.

Each loop does one `BatchGenerator.next`: one unit of a new prompt's prefill (the vision pass of
its new media, or a chunk of `prefill_step_size` tokens), then one token for every running job.
A job's chat template and media preparation (decoding and resizing a video's frames: host work
that grows with the video) run on a helper thread meanwhile (`ConversationPool.prepare`), from
the moment the job has a place in the batch: when it is queued, or when a running job ends
(`Engine.admit_with`), not when the step running then ends. The job starts between two loops
once they are done. Between loops, too, jobs whose client went away or
whose time ran out leave; the others' tokens never change, since each row is computed as it
would be alone.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from ..conversation.conversation import Conversation, Turn
from ..errors import MimoError
from ..generation.batch import BatchGenerator
from ..generation.sampling import make_logits_processors, make_sampler
from .answers import JobAnswer
from .events import (
    COUNTED_AS,
    REASONS,
    Failed,
    Finished,
    Job,
    client_error,
    internal_error,
    queue_timeout,
    shutting_down,
)

log = logging.getLogger("mimo_mlx.serve")


@dataclass(eq=False)
class _Row:
    job: Job
    chat: Conversation
    turn: Turn
    answer: JobAnswer
    generated: list[int] = field(default_factory=list)


class BatchLoop:
    """Runs an `Engine`'s jobs in batches until the engine closes (on its generation thread)."""

    def __init__(self, engine) -> None:
        self.engine, self.pool = engine, engine.pool
        self.rows: dict[int, _Row] = {}
        # Jobs taken whose turns are being prepared, in order of arrival (they hold their places
        # in the batch meanwhile), and the thread preparing them.
        self.preparing: list[tuple[Job, Future]] = []
        self.preparer: ThreadPoolExecutor | None = None
        # Jobs admitted by other threads (`Engine.admit_with`), for the generation thread to take.
        self.admitted: deque[tuple[Job, Future]] = deque()

    def run(self) -> None:
        with ThreadPoolExecutor(1, thread_name_prefix="mimo-mlx-prepare") as self.preparer:
            self.engine.admit_with(self._admit)
            try:
                while not self._serve():
                    log.error(
                        "the batch was reset after an internal error; new requests are served"
                    )
            finally:
                self.engine.admit_with(None)

    def _serve(self) -> bool:
        """Serve with one BatchGenerator: True when the engine has closed, False after an
        internal error failed every running job (the caller starts a fresh batch)."""
        engine = self.engine
        with BatchGenerator(
            self.pool.model,
            engine.tokenizer,
            max_batch=engine.max_batch,
            prefill_step_size=engine.prefill_step_size,
        ) as batch:
            while True:
                self._take_admitted()
                if not self.rows and not self.preparing:
                    if engine.closed:
                        return True
                    engine.wait_for(lambda: bool(self.admitted))
                    continue
                self._start_prepared(batch)
                self._drop_stopped(batch)
                if batch.has_work:
                    try:
                        items = batch.next()
                    except Exception:  # a bug must cost the running requests, not the server
                        log.exception("a batched step failed")
                        self._fail_all()
                        return False
                    self._dispatch(batch, items)
                else:  # nothing to step: wait for a preparation
                    wait([future for _, future in self.preparing], 0.05, FIRST_COMPLETED)
                engine.batch_bytes = batch.nbytes

    def _admit(self, job: Job) -> None:
        """A job has a place in the batch (on the thread that queued it or freed the place):
        its turn's preparation starts on the helper thread at once."""
        if time.monotonic() >= job.deadline:
            log.info("%s: its time ran out while it waited in the queue", job.id)
            self.engine.done(job, "timed_out", Failed(queue_timeout()))
            return
        future = self.preparer.submit(
            self.pool.prepare, job.messages, prompt=job.prompt, **job.options
        )
        self.admitted.append((job, future))
        self.engine.wake()

    def _take_admitted(self) -> None:
        """The jobs admitted since the last step join those being prepared (in order)."""
        while self.admitted:
            self.preparing.append(self.admitted.popleft())

    def _start_prepared(self, batch: BatchGenerator) -> None:
        """Start the jobs whose turns are ready."""
        ready = [(job, future) for job, future in self.preparing if future.done()]
        for job, future in ready:
            self.preparing.remove((job, future))
            self._start(batch, job, future)

    def _start(self, batch: BatchGenerator, job: Job, prepared: Future) -> None:
        """Take the job's conversation out of the pool and queue its sequence."""
        try:
            turn, options = prepared.result()
            chat, turn, start = self.pool.begin(turn=turn, **options)
        except MimoError as err:
            log.info("%s: refused: %s", job.id, err)
            self.engine.done(job, "invalid", Failed(client_error(err, job.scrub)))
            return
        except Exception:
            log.exception("%s: preparing the request failed", job.id)
            self.engine.done(job, "failed", Failed(internal_error()))
            return
        options = start.sampling
        # A seed gives the row its own random state: the draws of the request alone.
        sampler = make_sampler(
            options.temp, options.top_p, options.min_p, top_k=options.top_k, seed=options.seed
        )
        step = self.engine.prefill_step_size
        uid = batch.insert(
            lambda: start.prompt_steps(step),  # a video's vision pass a few frames at a time
            prompt_cache=start.cache,
            max_tokens=start.max_tokens,
            sampler=sampler,
            logits_processors=make_logits_processors(options.repetition_penalty),
            constraint=start.constraint,
            context=start.context,
            cached_tokens=start.cached_tokens,
            started=start.started,
        )
        inputs = turn.inputs  # notices: e.g. a video fitted to its budget
        answer = JobAnswer(job, self.engine.tokenizer, inputs.opens_thinking, inputs.notices)
        self.rows[uid] = _Row(job, chat, turn, answer)

    def _drop_stopped(self, batch: BatchGenerator) -> None:
        """Jobs whose client went away, or whose time ran out before their first token, leave
        now: from the batch (their conversations keep what was computed), or while their turns
        are prepared (their places free at once; the preparation's result is dropped)."""
        now = time.monotonic()
        for job, future in list(self.preparing):
            if not (job.cancelled or now >= job.deadline):
                continue
            self.preparing.remove((job, future))
            future.cancel()  # if it has not begun
            if job.cancelled:
                gone = job.cancelled == "disconnected"
                log.info("%s: %s while its media were prepared", job.id, REASONS[job.cancelled])
                self.engine.done(
                    job, COUNTED_AS[job.cancelled], None if gone else Failed(shutting_down())
                )
            else:
                log.info("%s: its time ran out while its media were prepared", job.id)
                self.engine.done(job, "timed_out", Failed(queue_timeout()))
        for uid, row in list(self.rows.items()):
            job = row.job
            late = not row.answer.started and now >= job.deadline
            if not (job.cancelled or late):
                continue
            batch.remove(uid)
            if job.cancelled:
                self._end(uid, row.answer.end)
            else:
                log.info("%s: its time ran out before its first token", job.id)
                self._end(uid, lambda: ("timed_out", Failed(queue_timeout())))

    def _dispatch(self, batch: BatchGenerator, items) -> None:
        """Hand each job its step's response; end the jobs whose answer is over."""
        for item in items:
            row = self.rows[item.uid]
            if item.error is not None:
                self._end(item.uid, lambda err=item.error, job=row.job: _failure(job, err))
                continue
            response = item.response
            row.generated.append(response.token)  # the cache holds it, whatever the client gets
            self.engine.peak_memory = max(self.engine.peak_memory, response.peak_memory)
            ending = row.answer.end
            try:
                over = row.answer.add(response)
            except Exception:
                log.exception("%s: handling its answer failed", row.job.id)
                over, ending = True, lambda: ("failed", Failed(internal_error()))
            if over:
                batch.remove(item.uid)  # still there unless the model finished it
                self._end(item.uid, ending)

    def _end(self, uid: int, outcome) -> None:
        """The row's job is over: its conversation goes back to the pool with the answer so
        far, then `outcome()` (outcome, last event) is counted and sent."""
        row = self.rows.pop(uid)
        try:
            self.pool.end(row.chat, row.turn, row.generated)
        except Exception:  # the conversation is dropped; the answer still goes out
            log.exception("%s: keeping its conversation failed", row.job.id)
        try:
            result: tuple[str, Finished | Failed | None] = outcome()
        except Exception:
            log.exception("%s: ending its answer failed", row.job.id)
            result = ("failed", Failed(internal_error()))
        self.engine.done(row.job, *result)

    def _fail_all(self) -> None:
        """After a failed step: every running job fails; their conversations are dropped (their
        caches may be part-way through the step). Jobs being prepared wait for the next batch."""
        for row in self.rows.values():
            self.engine.done(row.job, "failed", Failed(internal_error()))
        self.rows.clear()


def _failure(job: Job, err: Exception) -> tuple[str, Failed]:
    """A sequence the batch gave up on: the request's fault (a 400), or a bug (a 500)."""
    if isinstance(err, MimoError):
        log.info("%s: refused: %s", job.id, err)
        return "invalid", Failed(client_error(err, job.scrub))
    log.error("%s: generation failed", job.id, exc_info=err)
    return "failed", Failed(internal_error())
