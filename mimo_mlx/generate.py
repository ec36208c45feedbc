"""Text generation in three layers: `generate_step` (tokens), `stream_generate` (text pieces with
timings), `generate` (the whole answer, reasoning apart)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .cache import PromptCache
from .chat import ThinkingSplitter
from .errors import MimoError
from .model import Model
from .processing import DEFAULT_MAX_PIXELS
from .processor import ImageInput, ModelInputs, Processor
from .sampling import LogitsProcessor, Sampler, make_logits_processors, make_sampler
from .video import DEFAULT_VIDEO_FPS, DEFAULT_VIDEO_MAX_FRAMES

DEFAULT_MAX_TOKENS = 2048  # MiMo reasons before it answers; short limits cut the answer off
DEFAULT_PREFILL_STEP = 512
# stream_generate's options that shape the prompt rather than the sampling.
PROMPT_OPTIONS = ("system", "no_think", "min_pixels", "max_pixels", "fps", "max_frames")


def generate_step(
    model: Model,
    inputs: ModelInputs,
    sampler: Sampler,
    logits_processors: Sequence[LogitsProcessor] = (),
    max_tokens: int = DEFAULT_MAX_TOKENS,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    cache: PromptCache | None = None,
) -> Iterator[int]:
    """Yield generated token ids, one per step, until `max_tokens`; the caller stops on end tokens.

    The vision tower runs once, in the prefill; the prompt is prefilled in chunks of
    `prefill_step_size` tokens. Each decode step is built and queued before the previous token is
    read back, so building the graph overlaps with evaluating it.
    """
    cache = cache if cache is not None else model.make_cache()
    prepared = model.prepare_inputs(inputs.input_ids, **inputs.vision_kwargs(), cache=cache)
    cache.rope_deltas = prepared.rope_deltas
    embeds, positions = prepared.embeds, prepared.positions
    # Every token so far, kept only for logits processors (repetition penalty) that read it.
    history = mx.array(inputs.input_ids[0]) if logits_processors else None

    def sample(logits: mx.array) -> mx.array:
        for processor in logits_processors:
            logits = processor(history, logits)
        return sampler(logits)

    start = 0
    while embeds.shape[1] - start > prefill_step_size:
        end = start + prefill_step_size
        model.model(embeds[:, start:end], positions[:, :, start:end], cache.layers)
        mx.eval([layer.keys for layer in cache.layers])  # keep the graph one chunk deep
        start = end
    hidden = model.model(embeds[:, start:], positions[:, :, start:], cache.layers)
    token = sample(model.logits(hidden[:, -1]))  # (1,)
    mx.async_eval(token)
    for n in range(max_tokens):
        if n + 1 < max_tokens:
            if history is not None:
                history = mx.concatenate([history, token])
            next_token = sample(model(token[:, None], cache=cache)[:, -1])
            mx.async_eval(next_token)
        yield token.item()
        if n + 1 < max_tokens:
            token = next_token


@dataclass(frozen=True)
class GenerationResponse:
    """One streamed step: the new text (possibly empty while a character is incomplete) and stats."""

    text: str
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    time_to_first_token: float
    peak_memory_gb: float
    finish_reason: str | None = None  # "stop" (an end token) or "length" (max_tokens) at the end


@dataclass(frozen=True)
class GenerationResult:
    """A whole generation: the text, MiMo's reasoning and answer apart, and the final stats."""

    text: str
    thinking: str
    answer: str
    tokens: list[int]
    stats: GenerationResponse | None

    def __str__(self) -> str:
        return self.text


def stream_generate(
    model: Model,
    processor: Processor,
    prompt: str,
    images: Sequence[ImageInput] = (),
    video: str | Path | None = None,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    system: str | None = None,
    no_think: bool = False,
    min_pixels: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    fps: float = DEFAULT_VIDEO_FPS,
    max_frames: int = DEFAULT_VIDEO_MAX_FRAMES,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    inputs: ModelInputs | None = None,
) -> Iterator[GenerationResponse]:
    """Answer `prompt` about `images` / `video`, yielding text pieces as they are decoded.

    temperature 0 is greedy; otherwise tokens are sampled after top-k, top-p and min-p filtering.
    Generation stops at an end token of the tokenizer / generation config, or after `max_tokens`.
    `inputs` (from `processor.prepare`) replaces prompt/images/video when given.
    """
    if max_tokens < 1:
        raise MimoError(f"max_tokens must be at least 1, got {max_tokens}")
    sampler = make_sampler(temperature, top_p, top_k, min_p)
    processors = make_logits_processors(repetition_penalty)
    if seed is not None:
        mx.random.seed(seed)
    start = time.perf_counter()
    if inputs is None:
        inputs = processor.prepare(
            prompt,
            images,
            video,
            system=system,
            no_think=no_think,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            fps=fps,
            max_frames=max_frames,
        )
    check_context(model, inputs)
    prompt_tokens = inputs.input_ids.shape[1]
    detokenizer = processor.tokenizer.detokenizer()
    stop = processor.tokenizer.eos_token_ids
    mx.reset_peak_memory()
    steps = generate_step(model, inputs, sampler, processors, max_tokens, prefill_step_size)
    first = prompt_tps = 0.0
    for n, token in enumerate(steps, start=1):
        now = time.perf_counter()
        if n == 1:
            first = now - start
            prompt_tps = prompt_tokens / first
        finish = "stop" if token in stop else ("length" if n == max_tokens else None)
        text = detokenizer.add_token(token) if token not in stop else ""
        if finish:
            text += detokenizer.finalize()
        decode_time = now - start - first
        yield GenerationResponse(
            text=text,
            token=token,
            prompt_tokens=prompt_tokens,
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=(n - 1) / decode_time if n > 1 and decode_time > 0 else 0.0,
            time_to_first_token=first,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
        )
        if finish:
            break


def generate(
    model: Model,
    processor: Processor,
    prompt: str,
    images: Sequence[ImageInput] = (),
    video: str | Path | None = None,
    on_text: Callable[[str], None] | None = None,
    **kwargs,
) -> GenerationResult:
    """The whole answer; keyword arguments as in `stream_generate`. `on_text` sees each piece."""
    inputs = kwargs.pop("inputs", None)
    if inputs is None:
        options = {key: kwargs.pop(key) for key in PROMPT_OPTIONS if key in kwargs}
        inputs = processor.prepare(prompt, images, video, **options)
    pieces, tokens, last = [], [], None
    for response in stream_generate(model, processor, prompt, inputs=inputs, **kwargs):
        pieces.append(response.text)
        tokens.append(response.token)
        last = response
        if on_text is not None and response.text:
            on_text(response.text)
    text = "".join(pieces)
    splitter = ThinkingSplitter(prompt_opened_thinking=inputs.opens_thinking)
    parts = splitter.feed(text) + splitter.finalize()
    thinking = "".join(t for kind, t in parts if kind == "thinking")
    answer = "".join(t for kind, t in parts if kind == "answer")
    return GenerationResult(text, thinking.strip(), answer.strip(), tokens, last)


def check_context(model: Model, inputs: ModelInputs) -> None:
    """A prompt longer than the model's context is refused before any work is done."""
    limit = model.config.text.max_position_embeddings
    length = inputs.input_ids.shape[1]
    if length >= limit:
        raise MimoError(
            f"the prompt is {length} tokens ({inputs.vision_tokens} of them for images/video) but "
            f"the model's context is {limit}; use fewer or smaller images (--max-pixels), fewer "
            "video frames (--max-frames) or a shorter prompt"
        )
