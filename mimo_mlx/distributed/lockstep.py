"""Rank 0 drives, the other ranks follow: each request through the same forward passes on every rank.

Rank 0 (the `Leader`) turns a request into model inputs (chat template, images, video: only its
host needs the files) and sends them to every rank over the group. Every rank then runs the same
`stream_generate` on its part of the model. Rank 0 also decides every token: the token it samples
from its logits reaches the other ranks through one small `all_sum` inside the same lazy graph, so
the ranks cannot drift apart (random sampling included) and no step waits on the host for it.

    # rank 0                                            # every other rank
    with Leader(model, processor, group) as leader:     follow(model, processor, group)
        for response in leader.stream_generate(...):
            ...

One request runs at a time, each with a fresh cache on every rank. `Leader.request_stop` (from
any thread) ends the answer in progress on every rank within two tokens.

Between requests rank 0 sends a heartbeat every `HEARTBEAT_S`: MLX's ring backend spins a core
while a collective waits, so the other ranks wait for the next request asleep, between heartbeats,
rather than inside one collective (a server may idle for hours). The heartbeats also tell them
rank 0 is still there: without one for the group timeout, they stop.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import MimoError
from ..generation.loop import (
    DEFAULT_PREFILL_STEP,
    GenerationResponse,
    check_context,
    stream_generate,
)
from ..generation.sampling import Sampler, make_sampler
from ..inputs.processor import ImageInput, ModelInputs, Processor
from ..model.cache import check_cache_options
from ..model.mimo_vl import Model
from ..options import (
    DEFAULT_MAX_TOKENS,
    CacheOptions,
    pop_cache_options,
    pop_prompt_options,
    split_options,
)
from .group import Group, report_and_exit

_ARRAYS = ("input_ids", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
# Not 0: a collective MLX's ring backend gives up on (its peer gone) reads as zeros.
_LOST, _CLOSE, _GENERATE, _HEARTBEAT = 0, 1, 2, 3
HEARTBEAT_S = 0.05  # the most a request waits for the other ranks to look up
CLOSE_WAIT_S = 2.0  # how long closing waits for a heartbeat being sent to finish


@dataclass(frozen=True)
class Request:
    """What every rank needs to run one generation: the model inputs and how to generate."""

    inputs: ModelInputs
    max_tokens: int
    sampling: dict  # SamplingOptions' fields
    prefill_step_size: int = DEFAULT_PREFILL_STEP
    cache: dict = field(default_factory=dict)  # CacheOptions' fields: each rank's cache


def encode_request(request: Request) -> bytes:
    """The request as bytes: its arrays in an .npz, everything else as JSON inside it."""
    inputs = request.inputs
    meta = {
        "max_tokens": request.max_tokens,
        "sampling": request.sampling,
        "prefill_step_size": request.prefill_step_size,
        "cache": request.cache,
        "second_per_grid_ts": (
            None
            if inputs.second_per_grid_ts is None
            else [float(s) for s in inputs.second_per_grid_ts]
        ),
        "vision_tokens": inputs.vision_tokens,
    }
    arrays = {name: np.asarray(getattr(inputs, name)) for name in _ARRAYS}
    arrays = {name: value for name, value in arrays.items() if value.ndim}
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    return buffer.getvalue()


def decode_request(data: bytes) -> Request:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        meta = json.loads(archive["meta"].tobytes())
        arrays = {name: archive[name] for name in _ARRAYS if name in archive}
    inputs = ModelInputs(
        **arrays,
        second_per_grid_ts=meta["second_per_grid_ts"],
        vision_tokens=meta["vision_tokens"],
    )
    return Request(
        inputs, meta["max_tokens"], meta["sampling"], meta["prefill_step_size"], meta["cache"]
    )


def send_request(group: Group, request: Request | None) -> None:
    """Rank 0: hand `request` (None: no more requests) to every rank."""
    payload = b"" if request is None else encode_request(request)
    kind = _CLOSE if request is None else _GENERATE
    _broadcast(group, np.array([kind, len(payload)], np.int64))
    if payload:
        _broadcast(group, np.frombuffer(payload, np.uint8))


def send_heartbeat(group: Group) -> None:
    """Rank 0, between requests: "still here, nothing yet"."""
    _broadcast(group, np.array([_HEARTBEAT, 0], np.int64))


def receive_request(group: Group) -> Request | None:
    """Other ranks: the next request from rank 0, or None when it has no more. Heartbeats count
    as progress; between them this rank sleeps."""
    while True:
        kind, size = _broadcast(group, np.zeros(2, np.int64)).tolist()
        if kind != _HEARTBEAT:
            break
        group.progress()
        time.sleep(HEARTBEAT_S)  # as rank 0 does: the next one finds both ranks ready
    if kind == _CLOSE:
        return None
    if kind == _LOST:
        raise MimoError(
            f"{group.label}: lost the connection to rank 0: it stopped or its host went away, so "
            "every rank stops. An earlier message from rank 0, if any, says why."
        )
    return decode_request(_broadcast(group, np.zeros(size, np.uint8)).tobytes())


def _broadcast(group: Group, values: np.ndarray) -> np.ndarray:
    """Rank 0's `values` on every rank: the others pass zeros of the same shape and dtype, so the
    sum is rank 0's bytes exactly."""
    total = mx.distributed.all_sum(mx.array(values), group=group.mx_group, stream=mx.cpu)
    return np.array(total)


def shared_sampler(
    sampler: Sampler, group: Group, stop: threading.Event, stop_token: int
) -> Sampler:
    """`sampler` on rank 0, whose token every rank then uses; once `stop` is set, rank 0 sends
    `stop_token` (an end token) instead, so every rank ends the answer at the same step."""

    def sample(logprobs: mx.array) -> mx.array:
        if group.rank != 0:
            # After this rank's share of the pass, as on rank 0: every rank's collectives in
            # the same order.
            zeros = mx.depends(mx.zeros((logprobs.shape[0],), mx.uint32), logprobs)
            return mx.distributed.all_sum(zeros, group=group.mx_group)
        token = sampler(logprobs).astype(mx.uint32)
        if stop.is_set():
            token = mx.full(token.shape, stop_token, mx.uint32)
        return mx.distributed.all_sum(token, group=group.mx_group)

    return sample


def run_request(
    model: Model, processor: Processor, group: Group, request: Request, stop: threading.Event
) -> Iterator[GenerationResponse]:
    """The generation of `request` on this rank, tokens as rank 0 decides them."""
    options = dict(request.sampling)
    sampling = split_options(options)[1]
    sampler = make_sampler(sampling.temp, sampling.top_p, sampling.min_p, top_k=sampling.top_k)
    stop_token = min(processor.tokenizer.eos_token_ids)
    yield from stream_generate(
        model,
        processor,
        "",
        inputs=request.inputs,
        max_tokens=request.max_tokens,
        sampler=shared_sampler(sampler, group, stop, stop_token),
        prefill_step_size=request.prefill_step_size,
        **options,
        **request.cache,
    )


def refuse_structured(options: dict) -> None:
    """Structured output is not split across ranks yet: say so rather than ignore it."""
    for name in ("json_schema", "output_format"):
        if options.pop(name, None) is not None:
            raise MimoError(
                "structured output (JSON schemas, response_format, forced tool calls) is not "
                "available under mlx.launch yet; run without it"
            )


class Leader:
    """Rank 0's side: prepares each request, sends it to every rank, and streams the answer.

    Use as a context manager (or call `close`) so the other ranks learn when there is no more.
    One stream runs at a time (another thread's call waits for it). Read a stream to its end or
    close it; closing it early stops the answer on every rank first.
    """

    def __init__(self, model: Model, processor: Processor, group: Group) -> None:
        if group.rank != 0:
            raise MimoError(f"{group.label}: only rank 0 leads; the other ranks call follow()")
        self.model, self.processor, self.group = model, processor, group
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._busy = False  # a request is in flight: the other ranks are inside its collectives
        self._closed = False
        self._closing = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._heartbeat.start()

    def stream_generate(
        self,
        prompt: str = "",
        images: Sequence[ImageInput] | ImageInput = (),
        videos: Sequence[str | Path] | str | Path = (),
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        prefill_step_size: int = DEFAULT_PREFILL_STEP,
        inputs: ModelInputs | None = None,
        **options,
    ) -> Iterator[GenerationResponse]:
        """`generation.stream_generate` across the group (same arguments, no cache of your own).

        Everything that can be refused (options, files, the prompt's length) is checked here,
        before the other ranks hear of the request.
        """
        if max_tokens < 1:
            raise MimoError(f"max_tokens must be at least 1, got {max_tokens}")
        refuse_structured(options)
        cache = CacheOptions(**pop_cache_options(options))
        check_cache_options(cache, self.model.config.text.head_dim)  # before the ranks hear
        prompt_options, sampling = split_options(options)
        if inputs is None:
            inputs = self.processor.prepare(prompt, images, videos, **vars(prompt_options))
        check_context(self.model, inputs)
        request = Request(inputs, max_tokens, asdict(sampling), prefill_step_size, asdict(cache))
        with self._lock:
            if self._closed:
                raise MimoError("this Leader was closed; the other ranks have stopped following")
            yield from self._run(request)

    def request_stop(self) -> None:
        """End the answer in progress on every rank (its stream ends within two tokens)."""
        self._stop.set()

    def close(self) -> None:
        """Tell the other ranks there are no more requests (their `follow` returns).

        Does nothing while a stream is open or after one failed: the other ranks are inside its
        collectives then, and this rank's exit ends them instead. A heartbeat being sent holds
        the lock for a moment: close waits for it (and no other starts), or the other ranks
        would wait for a stop that never comes."""
        self._closing.set()  # no heartbeat starts from now on
        if not self._lock.acquire(timeout=CLOSE_WAIT_S):  # a stream left open by a reader's error
            return
        try:
            if self._closed or self._busy:
                return
            self._closed = True
            self._closing.set()
            with self.group.waiting("to tell the other ranks to stop"), self.group.errors():
                send_request(self.group, None)
        finally:
            self._lock.release()

    def _beat(self) -> None:
        """Heartbeats while no request runs (after a failed one the others are mid-collective:
        none then). A rank lost now ends this one, with one line, as it would mid-request."""
        while not self._closing.wait(HEARTBEAT_S):
            if not self._lock.acquire(blocking=False):
                continue  # a request is starting or running
            try:
                if self._closed or self._busy:
                    continue
                with self.group.waiting("between requests"), self.group.errors():
                    send_heartbeat(self.group)
            except MimoError as err:
                report_and_exit(str(err))
            finally:
                self._lock.release()

    def __enter__(self) -> Leader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, request: Request) -> Iterator[GenerationResponse]:
        self._stop.clear()
        group = self.group
        with group.waiting("while generating"), group.errors():
            self._busy = True
            send_request(group, request)
            responses = run_request(self.model, self.processor, group, request, self._stop)
            for response in responses:
                group.progress()
                try:
                    yield response
                except GeneratorExit:
                    # The reader stopped early, but every rank has queued the next token already:
                    # end the answer there and let every rank's stream run out together.
                    self._stop.set()
                    for _ in responses:
                        group.progress()
                    self._busy = False
                    raise
            self._busy = False  # not reached after an error: the others may be mid-collective


def follow(model: Model, processor: Processor, group: Group) -> int:
    """The other ranks' side: run each request rank 0 sends until it closes; returns how many.
    Rank 0's heartbeats keep the group timeout from running out between requests."""
    if group.rank == 0:
        raise MimoError("rank 0 leads (Leader); follow() is for the other ranks")
    never = threading.Event()
    served = 0
    while True:
        with group.waiting("for rank 0's next request"), group.errors():
            request = receive_request(group)
        if request is None:
            return served
        with group.waiting("while generating"), group.errors():
            for _ in run_request(model, processor, group, request, never):
                group.progress()
        served += 1


class LeaderPool:
    """What the server's engine asks of a conversation pool, over a Leader: `mimo-mlx serve`
    under mlx.launch. Each request runs across the ranks from a fresh cache (reusing earlier
    requests' tokens is not split across ranks: `cached_tokens` is 0)."""

    def __init__(self, leader: Leader, **options) -> None:
        """`options`: the default prompt and cache options, which requests override."""
        self.leader = leader
        self.cache_options = pop_cache_options(options)
        self.prompt_options = pop_prompt_options(options)
        self.opens_thinking = False  # of the running request's prompt
        self.notices: tuple[str, ...] = ()  # what preparing its media changed
        self.nbytes = 0

    def __len__(self) -> int:
        return 0

    def stats(self) -> dict:
        """Nothing is kept between requests (for /health)."""
        kept = ("bytes", "limit", "kv_bytes", "vision_bytes", "history_bytes")
        return {"conversations": 0, **dict.fromkeys(kept, 0)}

    def stream(self, messages: Sequence[dict], **options) -> Iterator[GenerationResponse]:
        refuse_structured(options)
        tools = options.pop("tools", None)
        prompt = {**self.prompt_options, **pop_prompt_options(options)}
        cache = {**self.cache_options, **pop_cache_options(options)}
        inputs = self.leader.processor.prepare_messages(messages, tools=tools, **prompt)
        self.opens_thinking, self.notices = inputs.opens_thinking, inputs.notices
        yield from self.leader.stream_generate(inputs=inputs, **options, **cache)

    def stream_text(self, prompt: str, **options) -> Iterator[GenerationResponse]:
        """A plain text completion across the ranks (no chat template)."""
        refuse_structured(options)
        if not prompt:
            raise MimoError("the prompt is empty")
        cache = {**self.cache_options, **pop_cache_options(options)}
        ids = np.array([self.leader.processor.tokenizer.encode(prompt)], dtype=np.int64)
        self.opens_thinking, self.notices = False, ()
        yield from self.leader.stream_generate(
            inputs=ModelInputs(ids, text=prompt), **options, **cache
        )
