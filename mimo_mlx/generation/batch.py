"""Several sequences at once: each prefilled alone, all decoded together (continuous batching).

`BatchGenerator` is the serving loop's object, as mlx-lm's is: `insert` a sequence whenever one
arrives, call `next` for one step of work, `remove` one that is no longer wanted. `batch_generate`
answers a list of prompts with it.

    with BatchGenerator(model, processor.tokenizer, max_batch=4) as batch:
        uid = batch.insert(model.prepare_prompt(ids), max_tokens=64)
        while batch.has_work:
            for item in batch.next():
                print(item.uid, item.response.text)

Each `next` does at most one unit of prefill work for the first waiting sequence (its vision
pass, or one chunk of `prefill_step_size` tokens) and then one decode step for every sequence in
the batch, so a long prompt (a video) delays the running answers by a chunk at a time, not by its
whole length. A prompt's last chunk (often its only one: a question after a cached image) runs
in the decode step's own pass when one pass serves the batch (`Model.decode_with_chunk`): its
rows share every matmul with the batch's, one read of the weights for both, and the sequence
decodes from the next step on. A sequence's prefill is `generate`'s own (the same chunks, the
same passes, its own `PromptCache`), so images, videos and cached prefixes work as they do
alone; it then joins the
batch (`model.batch_cache.BatchCache`), where every step feeds one token of each row through one
forward pass. Each row keeps its own sampler, logits processors, structured-output constraint,
token budget, end tokens and cache options: rows whose caches are quantized (`kv_bits`) decode in
a batch of their own kind, one forward pass per kind in a step, and a row reaching its
`quantized_kv_start` moves to a quantized batch then, as its cache would be quantized alone.

Exactness: a greedy sequence's tokens are its solo `generate` tokens wherever the backend computes
each row of a batched matmul as it computes that row alone, and masked padding adds exact zeros.
On the CPU with MLX's own BLAS both hold bit for bit (tests/test_batch.py checks the tokens and
the log-probabilities). With another BLAS or on a GPU, a row's logits may differ from its solo
run in the last bits, and a near-tie may then go the other way. A sampled sequence with a `seed`
draws from a random state of its own (`make_sampler(seed=...)`), the same draws as alone; without
a seed, rows share MLX's global random state, so no row's draws can match a solo run.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import MimoError
from ..inputs.processor import ImageInput, ModelInputs, Processor
from ..inputs.tokenizer import Tokenizer
from ..model.backend import generation_settings, release_cache
from ..model.batch_cache import BatchCache, storage_of
from ..model.cache import PromptCache
from ..model.mimo_vl import Model, Prompt
from ..options import DEFAULT_MAX_TOKENS, pop_cache_options, pop_lookup_options, split_options
from .constrained import Constraint, json_format
from .loop import (
    DEFAULT_PREFILL_STEP,
    GenerationResponse,
    GenerationResult,
    LastChunk,
    ResponseStream,
    _history,
    _stepper,
    check_context,
    collect,
    make_constraint,
    max_new_tokens,
    prefill_chunks,
)
from .sampling import LogitsProcessor, Sampler, greedy, make_logits_processors, make_sampler

DEFAULT_MAX_BATCH = 8


@dataclass(frozen=True)
class BatchResponse:
    """What one step gave one sequence: its next token's `response`, or the `error` that ended
    it (it has left; the others go on)."""

    uid: int
    response: GenerationResponse | None = None
    error: Exception | None = None


@dataclass(eq=False)
class _Sequence:
    uid: int
    source: Prompt | Callable[[], Prompt] | None  # None once prefilled: its pixels go
    cache: PromptCache
    max_tokens: int
    sampler: Sampler
    processors: list[LogitsProcessor]
    constraint: Constraint | None
    context: np.ndarray | None
    responses: ResponseStream
    prefill: Iterator | None = None
    step: Callable | None = None  # its `_stepper`, once its prompt is made
    history: mx.array | None = None
    token: mx.array | None = None  # (1,) the next token: emitted and fed at the next step
    logprobs: mx.array | None = None  # (vocab,), of that token

    @property
    def plain_greedy(self) -> bool:
        return self.sampler is greedy and not self.processors and self.constraint is None


@dataclass(eq=False)
class _Group:
    """Decoding sequences whose caches are stored alike, and the batch cache holding them."""

    cache: BatchCache
    rows: list[_Sequence] = field(default_factory=list)


class BatchGenerator:
    """Sequences that join and leave between steps, decoded together, at most `max_batch` at a
    time (the others wait, in order). Use it from one thread; as a context manager it also
    applies Apple silicon's generation settings (`backend.generation_settings`) while open."""

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        prefill_step_size: int = DEFAULT_PREFILL_STEP,
    ) -> None:
        if max_batch < 1:
            raise MimoError(f"max_batch must be at least 1, got {max_batch}")
        if prefill_step_size < 1:
            raise MimoError(f"prefill_step_size must be at least 1, got {prefill_step_size}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.prefill_step_size = max_batch, prefill_step_size
        self._waiting: deque[_Sequence] = deque()  # the first may be part-way through prefill
        # Decoding sequences, by how their caches are stored (`BatchCache.storage`): one batch
        # cache each, its rows in order. Usually one; a step runs one forward pass per group.
        self._groups: dict[tuple[int, int] | None, _Group] = {}
        self._uids = iter(range(2**62))
        self._stream: mx.Stream | None = None
        self._settings = None
        self._steps = 0

    def __enter__(self) -> BatchGenerator:
        self._settings = generation_settings(self.model)
        self._stream = self._settings.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Leave the generation settings (if entered); sequences still here are dropped."""
        for seq in [*self._waiting, *self._rows]:
            self.remove(seq.uid)
        if self._settings is not None:
            settings, self._settings, self._stream = self._settings, None, None
            settings.__exit__(None, None, None)

    @property
    def _rows(self) -> list[_Sequence]:
        """The decoding sequences, group by group (the order of a step's rows)."""
        return [seq for group in self._groups.values() for seq in group.rows]

    @property
    def has_work(self) -> bool:
        """Whether any sequence waits or decodes."""
        return bool(self._waiting or self._rows)

    @property
    def active(self) -> int:
        """Sequences decoding in the batch now."""
        return len(self._rows)

    @property
    def waiting(self) -> int:
        """Sequences not decoding yet (the first may be part-way through its prefill)."""
        return len(self._waiting)

    @property
    def nbytes(self) -> int:
        """Bytes the batch's caches hold (padding included; prefilling caches apart)."""
        return sum(group.cache.nbytes for group in self._groups.values())

    def insert(
        self,
        prompt: Prompt | Callable[[], Prompt],
        *,
        prompt_cache: PromptCache | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        sampler: Sampler | None = None,
        logits_processors: Sequence[LogitsProcessor] | None = None,
        constraint: Constraint | None = None,
        context: Sequence[int] | np.ndarray | None = None,
        cached_tokens: int = 0,
        started: float | None = None,
    ) -> int:
        """Queue a sequence; its uid. The arguments are `generate_step`'s and `stream_prompt`'s.

        `prompt` is a `Prompt` prepared against `prompt_cache` (or a fresh cache), or a function
        that returns one, or an iterator that yields None after each unit of its work and then
        the prompt (`prompt_steps`: a video's vision pass, a few frames at a time). It runs
        inside `next`, a unit per step, so it interleaves with decoding too. A given
        `prompt_cache` is extended as `generate_step`
        extends it: once the sequence finishes or is removed, it holds the prompt and the answer
        so far (while the sequence decodes, the batch holds its tokens). Timings count from
        `started` (default now); `cached_tokens` says how many prompt tokens the cache held.
        """
        if max_tokens < 1:
            raise MimoError(f"max_tokens must be at least 1, got {max_tokens}")
        started = time.perf_counter() if started is None else started
        seq = _Sequence(
            uid=next(self._uids),
            source=prompt,
            cache=prompt_cache if prompt_cache is not None else self.model.make_cache(),
            max_tokens=max_tokens,
            sampler=sampler or greedy,
            processors=list(logits_processors or ()),
            constraint=constraint,
            context=None if context is None else np.asarray(context),
            responses=ResponseStream(self.tokenizer, 0, cached_tokens, started, max_tokens),
        )
        self._waiting.append(seq)
        return seq.uid

    def remove(self, uid: int) -> bool:
        """Stop a sequence wherever it is (waiting, part-way through its prefill, decoding);
        its cache keeps what was computed. False if it was not here (it finished already)."""
        for seq in self._waiting:
            if seq.uid == uid:
                self._waiting.remove(seq)
                if seq.prefill is not None:
                    seq.prefill.close()
                return True
        for seq in self._rows:
            if seq.uid == uid:
                self._leave([seq])
                return True
        return False

    def next(self) -> list[BatchResponse]:
        """One step: a unit of prefill work (if a sequence waits and the batch has room), then
        one token for every sequence in the batch. Sequences that finish leave the batch here."""
        out: list[BatchResponse] = []
        failed, chunk = self._prefill_unit()
        if failed is not None:
            out.append(failed)
        if not self._groups:
            return out
        self._quantize_due()
        rows = self._rows
        fed, errors, first = self._decode(rows, chunk)  # queued; tokens below read meanwhile
        done = []
        for seq, (token, logprobs) in zip(rows, fed, strict=True):
            if seq.uid in errors:
                out.append(BatchResponse(seq.uid, error=errors[seq.uid]))
                done.append(seq)
                continue
            response = seq.responses.add(seq.token.item(), seq.logprobs)
            out.append(BatchResponse(seq.uid, response))
            seq.token, seq.logprobs = token, logprobs
            if response.finish_reason:
                done.append(seq)
        if done:
            self._leave(done)
        if chunk is not None:  # its prefill ended in this pass: it joins for the next step
            seq = chunk[0]
            if isinstance(first, Exception):
                self._end_prefill(seq)
                out.append(BatchResponse(seq.uid, error=first))
            else:
                self._joined(seq, first)
        self._steps += 1
        release_cache(self._steps)
        return out

    # ------------------------------------------------------------------ prefill

    def _prefill_unit(self) -> tuple[BatchResponse | None, tuple[_Sequence, LastChunk] | None]:
        """One unit of the first waiting sequence's prefill; when it completes, the sequence
        joins the batch with its first token. A failure ends that sequence only (its response
        comes first). When one decode pass serves the batch this step, the prefill's last chunk
        is not run here but returned with its sequence (second), for that pass to run."""
        if not self._waiting or len(self._rows) >= self.max_batch:
            return None, None
        seq = self._waiting[0]
        try:
            if seq.prefill is None:
                seq.prefill = self._prefill(seq)
            first = next(seq.prefill)
            if isinstance(first, LastChunk):
                decoding = [group for group in self._groups.values() if group.rows]
                if len(decoding) == 1 and not self._due():  # one decode pass this step
                    return None, (seq, first)
                plan = first.layers_per_eval
                first = seq.step(
                    seq.history, logits_to_keep=1, layers_per_eval=plan, **first.inputs
                )
        except Exception as err:  # noqa: BLE001  (reported to the sequence's owner)
            self._end_prefill(seq)
            return BatchResponse(seq.uid, error=err), None
        if first is not None:
            self._joined(seq, first)
        return None, None

    def _end_prefill(self, seq: _Sequence) -> None:
        """The sequence's prefill is over (done or failed): it stops waiting, and the frame of
        its prefill, which holds the prompt (pixels, features) and refers back to `seq`, is
        closed now, so that nothing of it waits for the garbage collector."""
        self._waiting.remove(seq)
        if seq.prefill is not None:
            seq.prefill.close()
        seq.prefill = seq.source = None

    def _joined(self, seq: _Sequence, first: tuple[mx.array, mx.array]) -> None:
        """The sequence's prefill gave its first token: it joins the batch."""
        self._end_prefill(seq)
        seq.token, seq.logprobs = first[0], first[1][0]
        mx.async_eval(seq.logprobs)  # read once the next step is queued: computed first
        self._join(seq)

    def _join(self, seq: _Sequence) -> None:
        """The sequence's tokens join the batch that stores them as its cache does."""
        storage = storage_of(seq.cache)
        group = self._groups.get(storage)
        if group is None:
            layers = len(self.model.model.layers)
            group = self._groups[storage] = _Group(BatchCache(layers, storage))
        group.cache.add(seq.cache)
        group.rows.append(seq)

    def _quantize_due(self) -> None:
        """Rows whose caches are to be quantized from now on (kv_bits, `quantized_kv_start`
        reached) move to a quantized batch, as `generate_step` would quantize them alone."""
        due = self._due()
        if not due:
            return
        self._leave(due)
        for seq in due:
            seq.cache.quantize()
            self._join(seq)

    def _due(self) -> list[_Sequence]:
        """The float rows whose caches are to be quantized before the next pass."""
        group = self._groups.get(None)
        if group is None:
            return []
        lengths = group.cache.lengths
        return [
            seq
            for seq, length in zip(group.rows, lengths, strict=True)
            if seq.cache.options.kv_bits is not None
            and length >= seq.cache.options.quantized_kv_start
        ]

    def _prefill(self, seq: _Sequence) -> Iterator:
        """The sequence's prefill in units: its prompt (the vision pass, when a function makes
        it, in the pieces its iterator yields), then `generate_step`'s chunks; the last yields
        (first token, log-probabilities)."""
        prompt = seq.source
        if not isinstance(prompt, Prompt):
            prompt = prompt()
            if isinstance(prompt, Prompt):
                yield None  # making it was this step's work
            else:  # an iterator: None after each unit, then the prompt
                for step in prompt:
                    if step is not None:
                        prompt = step
                        break
                    yield None
        if prompt.length == 0:
            raise MimoError("the prompt is empty")
        if prompt.input_ids.shape[0] != 1:
            raise MimoError(
                f"each sequence of a batch is one prompt, got {prompt.input_ids.shape[0]}"
            )
        seq.responses.prompt_length = prompt.length
        seq.history = _history(prompt, seq.context, seq.processors)
        seq.step = _stepper(
            self.model, seq.cache, seq.sampler, seq.processors, self._stream, seq.constraint
        )
        yield from prefill_chunks(
            prompt,
            self.model,
            seq.cache,
            seq.step,
            seq.history,
            self.prefill_step_size,
            self._stream,
            run_last=False,
        )

    # ------------------------------------------------------------------ decode

    def _decode(self, rows: list[_Sequence], chunk: tuple[_Sequence, LastChunk] | None = None):
        """Feed every row's next token through one pass; each row's next (token, log-probs),
        queued, the rows whose own processing failed (uid -> error), and with a waiting
        sequence's last prefill `chunk` (one group only), that sequence's first (token,
        log-probs) from the same pass, or the error that ended it."""
        first = None
        errors: dict[int, Exception] = {}
        groups = [group for group in self._groups.values() if group.rows]
        # Each row's own cache offset, as `generate_step` sees it.
        offsets = np.concatenate([group.cache.lengths for group in groups])
        ids = mx.concatenate([seq.token for seq in rows])[:, None]  # (B, 1)
        for seq in rows:
            if seq.history is not None:
                seq.history = mx.concatenate([seq.history, seq.token])
        with mx.stream(self._stream or mx.default_stream(mx.default_device())):
            if chunk is None:
                parts, start = [], 0
                for group in groups:
                    end = start + len(group.rows)
                    parts.append(self.model(ids[start:end], cache=group.cache)[:, 0])
                    start = end
            else:  # one group, and the chunk in its pass
                (group,), (seq, last) = groups, chunk
                offset = seq.cache.offset  # where the chunk goes
                batch_logits, chunk_logits = self.model.decode_with_chunk(
                    ids, group.cache, last.inputs, seq.cache, last.layers_per_eval
                )
                parts = [batch_logits[:, 0]]
                try:
                    ids_in = last.inputs["input_ids"]
                    first = seq.step.pick(chunk_logits[0], seq.history, ids_in, offset)
                except Exception as err:  # noqa: BLE001  (that sequence fails, not the batch)
                    first = err
            logits = (parts[0] if len(parts) == 1 else mx.concatenate(parts)).astype(mx.float32)
            if all(seq.plain_greedy for seq in rows):
                tokens = mx.argmax(logits, axis=-1)  # greedy reads the logits, as alone
                logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
                fed = [(tokens[i : i + 1], logprobs[i]) for i in range(len(rows))]
            else:
                if any(seq.constraint is not None for seq in rows):
                    mx.async_eval(logits)  # the pass runs while the grammars work
                fed = []
                for i, seq in enumerate(rows):
                    try:
                        row, row_ids, offset = logits[i : i + 1], ids[i : i + 1], int(offsets[i])
                        token, row_logprobs = seq.step.pick(row, seq.history, row_ids, offset)
                        fed.append((token, row_logprobs[0]))
                    except Exception as err:  # noqa: BLE001  (that row fails, not the batch)
                        errors[seq.uid] = err
                        fed.append((ids[i], logits[i]))
        # The log-probabilities too: a caller reads them while the next step runs, which a lazy
        # read would instead queue behind that whole step.
        mx.async_eval([array for pair in fed for array in pair])
        return fed, errors, first

    def _leave(self, done: list[_Sequence]) -> None:
        """Rows leave the batch; their caches get their tokens back, evaluated now so that they
        hold nothing of the batch's arrays."""
        handed = []
        for storage, group in list(self._groups.items()):
            index = {id(seq): i for i, seq in enumerate(group.rows)}
            leaving = [index[id(seq)] for seq in done if id(seq) in index]
            if not leaving:
                continue
            handed += group.cache.remove(leaving)
            group.rows = [seq for seq in group.rows if seq not in done]
            if not group.rows:
                del self._groups[storage]
        mx.eval([cache.state for cache in handed])


def batch_generate(
    model: Model,
    processor: Processor,
    prompts: Sequence[str | dict],
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    verbose: bool = False,
    on_response: Callable[[int, GenerationResponse], None] | None = None,
    **options,
) -> list[GenerationResult]:
    """Answer several prompts together; the results in order (see `BatchGenerator`).

    Each prompt is a string, or a dict of `stream_generate`'s arguments for that prompt alone
    (`prompt`, `images`, `videos`, `max_tokens`, sampling, prompt and cache options,
    `json_schema`) that override the shared `options`. Every sequence's answer is its `generate`
    answer (greedy: token for token; sampled with a `seed`: the same draws). Prompt lookup is not
    available in a batch. `on_response(index, response)` sees each step of the prompt at `index`
    as it comes, to stream several answers at once or time them.
    """
    requests = [_request(item, options) for item in prompts]
    started = time.perf_counter()
    prepared = [_prepare(model, processor, r, prefill_step_size) for r in requests]
    results: dict[int, list[GenerationResponse]] = {}
    with BatchGenerator(
        model, processor.tokenizer, max_batch=max_batch, prefill_step_size=prefill_step_size
    ) as batch:
        order = [batch.insert(**settings, started=started) for _, settings in prepared]
        results = {uid: [] for uid in order}
        index = {uid: i for i, uid in enumerate(order)}
        while batch.has_work:
            for item in batch.next():
                if item.error is not None:
                    raise item.error
                results[item.uid].append(item.response)
                if on_response is not None:
                    on_response(index[item.uid], item.response)
    answers = []
    for uid, (inputs, _) in zip(order, prepared, strict=True):
        answers.append(collect(results[uid]).with_inputs(inputs))
    if verbose:
        tokens = sum(len(a.tokens) for a in answers)
        elapsed = time.perf_counter() - started
        print(f"{len(answers)} prompts, {tokens} tokens in {elapsed:.2f} s: "
              f"{tokens / elapsed:.2f} tokens-per-sec together")  # fmt: skip
        print(f"Peak memory: {mx.get_peak_memory() / 1e9:.3f} GB")
    return answers


def _request(item: str | dict, shared: dict) -> dict:
    """One prompt's arguments: the shared options under its own."""
    request = {**shared, **({"prompt": item} if isinstance(item, str) else item)}
    if not isinstance(request.get("prompt"), str):
        raise MimoError("each prompt of a batch is a string, or a dict with a 'prompt' string")
    return request


def _prepare(model: Model, processor: Processor, request: dict, prefill_step_size: int):
    """(inputs, BatchGenerator.insert's arguments) for one prompt of `batch_generate`."""
    request = dict(request)
    prompt = request.pop("prompt")
    images: Sequence[ImageInput] = request.pop("images", ())
    videos: Sequence[str | Path] = request.pop("videos", ())
    max_tokens = request.pop("max_tokens", DEFAULT_MAX_TOKENS)
    schema = request.pop("json_schema", None)
    sampler = request.pop("sampler", None)
    processors = request.pop("logits_processors", None)
    if pop_lookup_options(request).enabled:
        raise MimoError("prompt lookup is not available in a batch; generate that prompt alone")
    cache_options = pop_cache_options(request)  # kv_bits, ...: how this prompt's cache is stored
    prompt_options, sampling = split_options(request)  # refuses unknown options
    inputs = processor.prepare(prompt, images, videos, **vars(prompt_options))
    check_context(model, inputs)
    output_format = None if schema is None else json_format(schema)
    constraint = make_constraint(model, processor.tokenizer, output_format, inputs)
    if sampler is None:
        sampler = make_sampler(
            sampling.temp, sampling.top_p, sampling.min_p, top_k=sampling.top_k, seed=sampling.seed
        )
    if processors is None:
        processors = make_logits_processors(sampling.repetition_penalty)
    cache = model.make_cache(**cache_options)
    settings = dict(
        prompt=lambda: prompt_steps(model, inputs, cache, prefill_step_size),
        prompt_cache=cache,
        max_tokens=max_new_tokens(model, inputs.input_ids.shape[1], max_tokens),
        sampler=sampler,
        logits_processors=processors,
        constraint=constraint,
    )
    return inputs, settings


def prompt_steps(
    model: Model, inputs: ModelInputs, cache: PromptCache, max_tokens: int
) -> Iterator[Prompt | None]:
    """`model.prepare_prompt` for `inputs` continuing `cache`, its vision pass in pieces of at
    most `max_tokens` merged tokens (`Model.encode_pieces`): None after each evaluated piece,
    then the prompt (see `BatchGenerator.insert`)."""
    pieces = []
    for pixels, grids in (
        (inputs.pixel_values, inputs.image_grid_thw),
        (inputs.pixel_values_videos, inputs.video_grid_thw),
    ):
        if pixels is None:
            continue
        for piece in model.encode_pieces(pixels, grids, max_tokens):
            mx.eval(piece)
            pieces.append(piece)
            yield None
    ids = inputs.input_ids
    features = None
    if pieces:  # images, then videos: into prompt order, as `prepare_prompt` puts them
        features = mx.concatenate(pieces)[mx.array(model.placeholder_order(ids))]
    yield model.prepare_prompt(
        ids,
        image_grid_thw=inputs.image_grid_thw,
        video_grid_thw=inputs.video_grid_thw,
        second_per_grid_ts=inputs.second_per_grid_ts,
        cache=cache,
        vision_features=features,
    )
