"""Text generation in three layers, as in mlx-lm: `generate_step` (token ids and log-probabilities),
`stream_generate` (text pieces with timings), `generate` (the whole answer, reasoning apart)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import ContextFull, MimoError
from ..grounding.parse import ParseResult
from ..inputs.processor import ImageInput, ModelInputs, Processor
from ..inputs.template import split_thinking
from ..inputs.tokenizer import Tokenizer
from ..model.backend import device_kind, generation_settings, prefill_schedule, release_cache
from ..model.cache import PromptCache
from ..model.mimo_vl import Model, Prompt
from ..options import (
    DEFAULT_MAX_TOKENS,
    CacheOptions,
    SamplingOptions,
    pop_cache_options,
    pop_lookup_options,
    pop_prompt_options,
    split_options,
)
from .constrained import Constraint, OutputFormat, Thinking, json_format
from .lookup import PromptLookup, warn_if_no_faster
from .pass_cost import measure_pass_cost
from .sampling import LogitsProcessor, Sampler, greedy, make_logits_processors, make_sampler

DEFAULT_PREFILL_STEP = 512


def generate_step(
    prompt: Prompt | np.ndarray | mx.array,
    model: Model,
    *,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    prompt_cache: PromptCache | None = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    context: Sequence[int] | np.ndarray | None = None,
    constraint: Constraint | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
) -> Iterator[tuple[int, mx.array]]:
    """Yield (token id, log-probabilities over the vocabulary) until `max_tokens`; the caller stops
    on end tokens.

    `prompt` is a `Prompt` from `model.prepare_prompt` (images, video, positions), or the token ids
    of a text prompt. A given `prompt_cache` is extended in place (a `Prompt` must have been
    prepared against it). The prompt is prefilled in chunks of `prefill_step_size` through the
    model's own call, with logits for its last token only; each decode step is queued before the
    previous token is read back; if the caller stops early, the cache holds the prompt and the
    tokens yielded, no more. `context` is the whole prompt's ids when `prompt` continues a cache:
    logits processors (repetition penalty) see all of them, as they would without the cache. The
    log-probabilities are lazy arrays: with the greedy sampler (the default, or `make_sampler(0)`)
    they are computed only if read. A `constraint` (see `generation.constrained`, one per
    generation) masks the tokens its grammar refuses. `kv_bits`, `kv_group_size` and
    `quantized_kv_start` (mlx-lm's) say how a new cache stores keys and values
    (`options.CacheOptions`); a given `prompt_cache` was made with its own.
    """
    cache_options = CacheOptions(kv_bits, kv_group_size, quantized_kv_start)
    cache, prompt, sampler, processors = _begin(
        prompt, model, prompt_cache, sampler, logits_processors, cache_options
    )
    history = _history(prompt, context, processors)

    end_of_prompt, given = cache.offset + prompt.length, 0
    with generation_settings(model) as stream:
        step = _stepper(model, cache, sampler, processors, stream, constraint)
        try:
            token, logprobs = _prefill(
                prompt, model, cache, step, history, prefill_step_size, stream
            )
            for n in range(max_tokens):
                if n + 1 < max_tokens:
                    if history is not None:
                        history = mx.concatenate([history, token])
                    next_token, next_logprobs = step(history, input_ids=token[:, None])
                value, given = token.item(), n + 1
                yield value, logprobs[0]
                release_cache(n + 1)
                if n + 1 < max_tokens:
                    token, logprobs = next_token, next_logprobs
        finally:
            # Stopped early (the caller closed us, or Ctrl-C arrived while a token was read),
            # the next step may be queued already: the cache keeps no token the caller was not
            # given, so what it holds is always the prompt and the tokens yielded.
            cache.trim(cache.offset - (end_of_prompt + given))


def lookup_generate_step(
    prompt: Prompt | np.ndarray | mx.array,
    model: Model,
    *,
    lookup: PromptLookup | None = None,
    context: Sequence[int] | np.ndarray | None = None,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    prompt_cache: PromptCache | None = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    constraint: Constraint | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
) -> Iterator[tuple[int, mx.array, bool]]:
    """`generate_step` with prompt-lookup decoding (see `generation.lookup`): yields (token id,
    log-probabilities, from_draft) as mlx-lm's `speculative_generate_step` does. The tokens are
    the ones `generate_step` would give: greedy, the same; sampled, the same distribution.

    `lookup` (default `PromptLookup()`) drafts and keeps the counts. `context` is every token the
    answer may copy from (default: the prompt's ids; give the whole conversation when `prompt`
    continues a cache). Samplers must treat rows independently and logits processors must be
    functions of (tokens, logits): a draft is verified by sampling after each of its tokens at
    once, each row's processors seeing the tokens up to it. A `constraint` masks each row with
    its grammar's state after the draft tokens before it. The cache options are `generate_step`'s.
    """
    cache_options = CacheOptions(kv_bits, kv_group_size, quantized_kv_start)
    cache, prompt, sampler, processors = _begin(
        prompt, model, prompt_cache, sampler, logits_processors, cache_options
    )
    lookup = lookup if lookup is not None else PromptLookup()
    warn_if_no_faster(model)
    placeholders = (model.config.image_token_id, model.config.video_token_id)
    lookup.begin(prompt.input_ids[0] if context is None else np.asarray(context), placeholders)
    history = _history(prompt, context, processors)
    with generation_settings(model) as stream:
        step = _stepper(model, cache, sampler, processors, stream, constraint)
        token, logprobs = _prefill(prompt, model, cache, step, history, prefill_step_size, stream)
        yield from lookup.decode(
            step, token, logprobs, cache, max_tokens, history, partial(measure_pass_cost, model)
        )


def _history(prompt: Prompt, context, processors) -> mx.array | None:
    """Every token so far, kept only for logits processors (repetition penalty) that read it: the
    whole prompt, its cached part included."""
    if not processors:
        return None
    return mx.array(prompt.input_ids[0] if context is None else np.asarray(context))


def _begin(prompt, model: Model, cache, sampler, processors, cache_options: CacheOptions):
    """The cache, the prepared prompt, the sampler (default greedy) and the processors."""
    cache = cache_for(model, cache, cache_options)
    if not isinstance(prompt, Prompt):
        prompt = model.prepare_prompt(np.asarray(prompt).reshape(1, -1), cache=cache)
    if prompt.length == 0:
        raise MimoError("the prompt is empty")
    if prompt.input_ids.shape[0] != 1:
        raise MimoError(
            f"generation decodes one sequence at a time, got {prompt.input_ids.shape[0]}"
        )
    sampler = sampler or greedy
    return cache, prompt, sampler, list(processors or ())


def cache_for(model: Model, cache: PromptCache | None, options: CacheOptions) -> PromptCache:
    """`cache`, or a new one stored as `options` say. A given cache keeps how it was made:
    options asking for another storage are an error, not a silent conversion."""
    if cache is None:
        return model.make_cache(**vars(options))
    if options != CacheOptions() and options != cache.options:
        raise MimoError(
            f"the prompt cache given stores its tokens {cache.options.describe()}, but "
            f"{options.describe()} was asked for; make it with "
            "model.make_cache(kv_bits=..., kv_group_size=..., quantized_kv_start=...) or leave "
            "the cache options out"
        )
    return cache


def _stepper(model: Model, cache: PromptCache, sampler, processors, stream, constraint=None):
    """step(history, logits_to_keep=0, **inputs): feed L tokens continuing the cache and queue the
    pass; the token sampled after each of the last R (all L when logits_to_keep is 0) and their
    log-probabilities (R, vocab). `history` is every token fed up to the first of those R;
    processors at row i also see the inputs up to it.

    The pass and the tokens are queued whatever the sampler reads (a sampler may ignore the
    scores: on ranks other than 0 it does); with the greedy sampler the log-probabilities stay
    lazy, computed only if read. A constraint waits on the host for the tokens fed (the pass is
    queued first, so the grammar works while it runs) and masks what its grammar refuses,
    before the sampler sees the scores."""

    def step(history: mx.array | None, logits_to_keep: int = 0, **inputs):
        offset = cache.offset  # where these inputs go
        with mx.stream(stream or mx.default_stream(mx.default_device())):
            logits = model(**inputs, cache=cache, logits_to_keep=logits_to_keep)[0]
        return pick(logits, history, inputs["input_ids"], offset)

    def pick(logits: mx.array, history: mx.array | None, ids: mx.array, offset: int):
        """The tokens and log-probabilities of `step`, from the logits (R, vocab) of the last R
        of inputs `ids` (1, L) that went into the cache at `offset` (a pass made elsewhere:
        `Model.decode_with_chunk`)."""
        with mx.stream(stream or mx.default_stream(mx.default_device())):
            # float32 from here on, as transformers' generate does: processors, log-probs
            # and sampling see full-precision scores whatever the model computes in.
            logits = logits.astype(mx.float32)  # (R, vocab)
            if processors:
                first = ids.shape[1] - logits.shape[0]  # the input of row 0
                rows = []
                for i in range(logits.shape[0]):
                    seen = history
                    if i > 0:
                        seen = mx.concatenate([history, ids[0, first + 1 : first + i + 1]])
                    row = logits[i : i + 1]
                    for processor in processors:
                        row = processor(seen, row)
                    rows.append(row)
                logits = mx.concatenate(rows)
            if constraint is not None:
                mx.async_eval(logits)
                logits = constraint.mask(logits, ids, offset)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            # Greedy reads the logits (the same argmax, transformers' own choice): the vocabulary's
            # log-sum-exp then runs only if the caller reads the log-probabilities.
            token = sampler(logits if sampler is greedy else logprobs)
        mx.async_eval(token, logits)
        return token, logprobs

    step.pick = pick
    return step


def _prefill(prompt: Prompt, model: Model, cache, step, history, step_size: int, stream):
    """Prefill the prompt in chunks of `step_size` (no logits), the last chunk through `step` with
    the last token's logits only: (first token (1,), its log-probabilities (1, vocab)), queued.
    The last token rides with its chunk rather than a pass of its own: one pass over the weights
    fewer before the first token. Each chunk is evaluated as the backend's memory plan says
    (`backend.prefill_schedule`)."""
    *_, first = prefill_chunks(prompt, model, cache, step, history, step_size, stream)
    return first


@dataclass(frozen=True)
class LastChunk:
    """The last chunk of a prefill, not run yet: `Model.__call__`'s arguments for it, and the
    memory plan its pass should follow."""

    inputs: dict
    layers_per_eval: int


def prefill_chunks(
    prompt: Prompt, model: Model, cache, step, history, step_size: int, stream, run_last=True
):
    """`_prefill` one chunk at a time: yields None after each evaluated chunk but the last, then
    the first token and its log-probabilities (queued), or with `run_last` False the last chunk
    unrun (`LastChunk`: a batch runs it in its next decode pass). A batch interleaves these
    chunks with the decode steps of sequences already running."""
    text = model.config.text
    plan = prefill_schedule(
        device_kind(),
        model.model.norm.weight.dtype,  # the activations' dtype, quantized or not
        min(step_size, prompt.length),
        text.hidden_size,
        text.intermediate_size,
    )
    start = 0
    while prompt.length - start > step_size:
        with mx.stream(stream or mx.default_stream(mx.default_device())):
            # logits unevaluated
            model(**prompt.chunk(start, start + step_size), cache=cache, layers_per_eval=plan)
        mx.eval(cache.state)  # keep the graph one chunk deep
        start += step_size
        yield None
    if not run_last:
        yield LastChunk(prompt.chunk(start), plan)
        return
    yield step(history, logits_to_keep=1, layers_per_eval=plan, **prompt.chunk(start))


@dataclass(frozen=True)
class GenerationResponse:
    """One streamed step (mlx-lm's fields, plus the time to the first token).

    text is the new text (possibly empty while a character is incomplete); peak_memory is in GB;
    prompt_tps counts the prompt tokens computed (not those reused from a cache).
    finish_reason is "stop" (an end token) or "length" (max_tokens or the model's context) at the
    last step, else None. With prompt lookup, from_draft says the token was drafted and accepted;
    drafted_tokens and accepted_tokens count the draft tokens verified and accepted so far.
    """

    text: str
    token: int
    logprobs: mx.array
    from_draft: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    time_to_first_token: float
    finish_reason: str | None = None
    cached_tokens: int = 0  # prompt tokens reused from the cache, not computed again
    drafted_tokens: int = 0
    accepted_tokens: int = 0


@dataclass(frozen=True)
class GenerationResult:
    """A whole generation: the text, MiMo's reasoning and answer apart, and the final stats."""

    text: str
    thinking: str
    answer: str
    tokens: list[int]
    stats: GenerationResponse | None
    inputs: ModelInputs | None = None  # what was asked, images' resize included

    def __str__(self) -> str:
        return self.text

    def with_inputs(self, inputs: ModelInputs) -> GenerationResult:
        """This result for a generation from `inputs`: the reasoning split from the answer (the
        template may have opened <think> already), and the inputs kept for `grounding`."""
        thinking, answer = split_thinking(self.text, prompt_opened_thinking=inputs.opens_thinking)
        return replace(self, thinking=thinking, answer=answer, inputs=inputs)

    @property
    def grounding(self) -> ParseResult:
        """The answer's boxes, points and GUI actions in pixels of the user's image (a prompt with
        one image; see `grounding_report.ground`). `.boxes`, `.points`, `.actions`, `.skipped`."""
        from ..grounding.report import ground  # noqa: PLC0415  (only when asked)

        return ground(self.text, self.inputs)


def max_new_tokens(model: Model, prompt_tokens: int, max_tokens: int) -> int:
    """`max_tokens`, capped so the prompt and the answer fit the model's context."""
    limit = model.config.text.max_position_embeddings
    return max(0, min(max_tokens, limit - prompt_tokens))


def stream_generate(
    model: Model,
    processor: Processor,
    prompt: str,
    images: Sequence[ImageInput] | ImageInput = (),
    videos: Sequence[str | Path] | str | Path = (),
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    prompt_cache: PromptCache | None = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    inputs: ModelInputs | None = None,
    json_schema: dict | None = None,
    **options,
) -> Iterator[GenerationResponse]:
    """Answer `prompt` about `images` and `videos`, yielding text pieces as they are decoded.

    `options` are the prompt options (`options.PromptOptions`: system, no_think, min_pixels,
    max_pixels, fps, max_frames, ...), sampling options (`options.SamplingOptions`: temp,
    top_p, top_k, min_p, repetition_penalty, seed), prompt-lookup options
    (`options.LookupOptions`: prompt_lookup, prompt_lookup_num_tokens, max_matching_ngram_size)
    and cache options (`options.CacheOptions`: kv_bits, kv_group_size, quantized_kv_start, for
    the cache this call makes; a given `prompt_cache` keeps its own); a `sampler` or
    `logits_processors` replace the sampling options. Generation stops at an end
    token of the tokenizer / generation config, after `max_tokens`, or when the model's context is
    full. `inputs` (from `processor.prepare`) replaces prompt, images, videos and the prompt
    options. With a `json_schema` (a dict; `{"type": "object"}` for any object) the answer is
    JSON valid against it, enforced while decoding (needs the `structured` extra); MiMo may
    reason first unless `no_think`.
    """
    if max_tokens < 1:
        raise MimoError(f"max_tokens must be at least 1, got {max_tokens}")
    lookup = PromptLookup.from_options(pop_lookup_options(options))
    cache_options = CacheOptions(**pop_cache_options(options))
    prompt_options, sampling = split_options(options)
    output_format = None if json_schema is None else json_format(json_schema)
    start = time.perf_counter()
    cache = cache_for(model, prompt_cache, cache_options)  # bad options fail before any work
    if inputs is None:
        inputs = processor.prepare(prompt, images, videos, **vars(prompt_options))
    check_context(model, inputs)
    constraint = make_constraint(model, processor.tokenizer, output_format, inputs)
    sampler, logits_processors = _sampling(sampling, sampler, logits_processors)
    mx.reset_peak_memory()
    prepared = model.prepare_prompt(inputs.input_ids, **inputs.vision_kwargs(), cache=cache)
    yield from stream_prompt(
        model,
        processor.tokenizer,
        prepared,
        cache,
        started=start,
        max_tokens=max_new_tokens(model, inputs.input_ids.shape[1], max_tokens),
        sampler=sampler,
        logits_processors=logits_processors,
        prefill_step_size=prefill_step_size,
        lookup=lookup,
        constraint=constraint,
    )


def make_constraint(
    model: Model, tokenizer: Tokenizer, output_format: OutputFormat | None, inputs: ModelInputs
) -> Constraint | None:
    """The constraint enforcing `output_format` on the answer to `inputs` (None: none). MiMo
    reasons first unless the prompt asks it not to; a template may have opened `<think>`."""
    if output_format is None:
        return None
    thinking: Thinking = "optional"
    if inputs.opens_thinking:
        thinking = "opened"
    elif inputs.no_think:
        thinking = "off"
    return Constraint(output_format, tokenizer, model.config.text.vocab_size, thinking)


def stream_prompt(
    model: Model,
    tokenizer: Tokenizer,
    prompt: Prompt,
    cache: PromptCache,
    *,
    started: float,
    max_tokens: int,
    sampler: Sampler,
    logits_processors: Sequence[LogitsProcessor],
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    cached_tokens: int = 0,
    lookup: PromptLookup | None = None,
    context: np.ndarray | None = None,
    constraint: Constraint | None = None,
) -> Iterator[GenerationResponse]:
    """Stream the answer to a prepared prompt that continues `cache` (holding `cached_tokens`
    tokens of the whole prompt already); timings count from `started`. `context` is the whole
    prompt's ids (default: `prompt`'s): logits processors see them all, and with a `lookup` drafts
    are copied from them. A `constraint` (`make_constraint`) shapes the answer."""
    responses = ResponseStream(tokenizer, prompt.length, cached_tokens, started, max_tokens)
    settings = dict(
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=logits_processors,
        prompt_cache=cache,
        prefill_step_size=prefill_step_size,
        constraint=constraint,
    )
    if lookup is None:
        run = generate_step(prompt, model, context=context, **settings)
        steps = ((t, lp, False) for t, lp in run)
    else:
        steps = lookup_generate_step(prompt, model, lookup=lookup, context=context, **settings)
    for token, logprobs, from_draft in steps:
        response = responses.add(token, logprobs, from_draft, lookup)
        yield response
        if response.finish_reason:
            break


class ResponseStream:
    """Turns one sequence's tokens into `GenerationResponse`s: its text (detokenized as it
    goes), when it finishes (an end token of the tokenizer, or `max_tokens`) and its timings,
    counted from `started`. `prompt_length` tokens were computed, after `cached_tokens` reused."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_length: int,
        cached_tokens: int,
        started: float,
        max_tokens: int,
    ) -> None:
        self.detokenizer = tokenizer.detokenizer()
        self.stop = tokenizer.eos_token_ids
        self.prompt_length, self.cached_tokens = prompt_length, cached_tokens
        self.started, self.max_tokens = started, max_tokens
        self.count = 0  # tokens so far
        self.first = self.prompt_tps = 0.0

    def add(
        self, token: int, logprobs: mx.array, from_draft: bool = False, lookup=None
    ) -> GenerationResponse:
        """The response for the next token."""
        now = time.perf_counter()
        self.count += 1
        n = self.count
        if n == 1:
            self.first = now - self.started
            self.prompt_tps = self.prompt_length / self.first
        stop = token in self.stop
        finish = "stop" if stop else ("length" if n >= self.max_tokens else None)
        text = self.detokenizer.add_token(token) if not stop else ""
        if finish:
            text += self.detokenizer.finalize()
        decode_time = now - self.started - self.first
        return GenerationResponse(
            text=text,
            token=token,
            logprobs=logprobs,
            from_draft=from_draft,
            prompt_tokens=self.cached_tokens + self.prompt_length,
            prompt_tps=self.prompt_tps,
            generation_tokens=n,
            generation_tps=(n - 1) / decode_time if n > 1 and decode_time > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            time_to_first_token=self.first,
            finish_reason=finish,
            cached_tokens=self.cached_tokens,
            drafted_tokens=lookup.drafted if lookup else 0,
            accepted_tokens=lookup.accepted if lookup else 0,
        )


def _sampling(
    options: SamplingOptions,
    sampler: Sampler | None,
    processors: Sequence[LogitsProcessor] | None,
) -> tuple[Sampler, list[LogitsProcessor]]:
    if options.seed is not None:
        mx.random.seed(options.seed)
    if sampler is None:
        sampler = make_sampler(options.temp, options.top_p, options.min_p, top_k=options.top_k)
    if processors is None:
        processors = make_logits_processors(options.repetition_penalty)
    return sampler, list(processors)


def generate(
    model: Model,
    processor: Processor,
    prompt: str,
    images: Sequence[ImageInput] | ImageInput = (),
    videos: Sequence[str | Path] | str | Path = (),
    verbose: bool = False,
    **kwargs,
) -> GenerationResult:
    """The whole answer; keyword arguments as in `stream_generate`. With `verbose`, the text is
    printed as it streams, then the statistics, as mlx-lm's `generate` does."""
    inputs = kwargs.pop("inputs", None)
    prompt_options = pop_prompt_options(kwargs)
    if inputs is None:
        inputs = processor.prepare(prompt, images, videos, **prompt_options)
    if verbose:
        for notice in inputs.notices:
            print(f"note: {notice}")
        print("=" * 10)
    show = (lambda text: print(text, end="", flush=True)) if verbose else None
    result = collect(stream_generate(model, processor, prompt, inputs=inputs, **kwargs), show)
    if verbose:
        last = result.stats
        print()
        print("=" * 10)
        print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec")
        print(
            f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec"
        )
        if last.drafted_tokens:
            print(
                f"Prompt lookup: {last.accepted_tokens} of {last.drafted_tokens} drafted tokens "
                "accepted"
            )
        print(f"Peak memory: {last.peak_memory:.3f} GB")
    return result.with_inputs(inputs)


def collect(
    responses: Iterable[GenerationResponse], on_text: Callable[[str], None] | None = None
) -> GenerationResult:
    """A whole answer from its stream (`on_text` sees each piece); `with_inputs` then says what
    was asked, which splits the reasoning from the answer."""
    pieces, tokens, last = [], [], None
    for response in responses:
        pieces.append(response.text)
        tokens.append(response.token)
        last = response
        if on_text is not None:
            on_text(response.text)
    text = "".join(pieces)
    return GenerationResult(text, "", text, tokens, last)


def check_context(model: Model, inputs: ModelInputs) -> None:
    """A prompt that leaves no room for an answer in the model's context is refused up front
    (ContextFull: a server answers it in its own words, without the command line's flags)."""
    limit = model.config.text.max_position_embeddings
    length = inputs.input_ids.shape[1]
    if length >= limit:
        raise ContextFull(
            f"the prompt is {length} tokens ({inputs.vision_tokens} of them for images/video) but "
            f"the model's context is {limit}; use fewer or smaller images (--max-pixels), fewer "
            "video frames (--max-frames) or a shorter prompt",
            tokens=length,
            limit=limit,
        )
