"""Multi-turn conversations that never compute what they have already seen.

Each turn renders the whole conversation with the chat template, as transformers would for a fresh
`generate`, and tokenizes it. The cache already holds a prefix of those tokens (the earlier turns,
and the answers as they were generated): only the tokens after the longest common prefix are
prefilled. Where the template renders history differently from what was generated (it re-tokenizes
an answer, or drops past reasoning), the cache is trimmed back to the first difference, rotary
offsets included, and continues from there. Tokens of an image or video compare by the item's
content key, never by their placeholder ids, and encoded items come from a shared `VisionCache`.

    chat = Conversation(model, processor)
    print(chat.ask("What is in this picture?", images=["photo.jpg"]).answer)
    print(chat.ask("And what colour is it?").answer)       # the image is not encoded again
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import ContextFull, MimoError
from ..generation.constrained import Constraint, OutputFormat, json_format
from ..generation.lookup import PromptLookup
from ..generation.loop import (
    DEFAULT_PREFILL_STEP,
    GenerationResponse,
    GenerationResult,
    _sampling,
    collect,
    make_constraint,
    stream_prompt,
)
from ..generation.pass_cost import PassCost
from ..generation.sampling import LogitsProcessor, Sampler
from ..inputs.messages import Message, with_media
from ..inputs.processor import ImageInput, ModelInputs, PreparedMedia, Processor, _as_list
from ..model.cache import PromptCache
from ..model.mimo_vl import Model, Prompt
from ..options import (
    DEFAULT_MAX_TOKENS,
    CacheOptions,
    PromptOptions,
    SamplingOptions,
    pop_cache_options,
    pop_lookup_options,
    pop_prompt_options,
)
from .file import SavedConversation, load_conversation, save_conversation
from .vision_cache import VisionCache, shared_vision_cache


@dataclass(frozen=True)
class Turn:
    """A conversation's next turn, prepared: its messages, their inputs and token identities.
    A `raw` turn is a plain text prompt (no chat template, no messages)."""

    messages: list[Message]
    inputs: ModelInputs
    identity: np.ndarray
    raw: bool = False


@dataclass(frozen=True)
class TurnStart:
    """A turn ready to generate (`Conversation.begin_turn`): `prompt()` runs the vision tower on
    the media the cache lacks (cached features reused) and returns the prompt continuing
    `cache`, which already holds `cached_tokens` of it; `prompt_steps(max_tokens)` does the same
    a piece of the tower at a time (None after each, then the prompt: see `BatchGenerator`).
    `context` is the whole prompt's ids, for logits processors; timings count from `started`."""

    prompt_steps: Callable[..., Iterator[Prompt | None]]
    cache: PromptCache
    cached_tokens: int
    max_tokens: int
    constraint: Constraint | None
    context: np.ndarray
    sampling: SamplingOptions
    started: float

    def prompt(self) -> Prompt:
        *_, prompt = self.prompt_steps()
        return prompt


class Conversation:
    """A chat with one model: its messages, and a cache of everything it has computed.

    `prompt_options` (`options.PromptOptions`: system, no_think, pixel limits, video sampling)
    hold for every turn. `max_kv_size` bounds the tokens kept (default: the model's context);
    a turn that would not fit is refused, or with `drop_old_turns` the oldest exchanges are
    dropped until it fits. `kv_bits`, `kv_group_size` and `quantized_kv_start` (mlx-lm's
    names, `options.CacheOptions`) store the cache quantized: a long conversation takes about
    half (8 bits) or a quarter (4 bits) of the memory.
    """

    def __init__(
        self,
        model: Model,
        processor: Processor,
        *,
        vision_cache: VisionCache | None = None,
        max_kv_size: int | None = None,
        drop_old_turns: bool = False,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
        quantized_kv_start: int = 0,
        **prompt_options,
    ) -> None:
        self.model, self.processor = model, processor
        self.cache_options = CacheOptions(kv_bits, kv_group_size, quantized_kv_start)
        self.prompt_options = PromptOptions(**prompt_options)
        processor.check_options(self.prompt_options)  # at the start, not at the first image
        self.vision_cache = vision_cache if vision_cache is not None else shared_vision_cache()
        context = model.config.text.max_position_embeddings
        if max_kv_size is not None and not 0 < max_kv_size <= context:
            raise MimoError(f"max_kv_size must be between 1 and the model's context, {context}")
        self.max_kv_size = max_kv_size or context
        self.drop_old_turns = drop_old_turns
        self.lookup_cost: PassCost | None = None  # measured by the first turn that drafts
        self.reset()

    def reset(self) -> None:
        """Forget every turn and everything cached (the shared vision cache stays)."""
        self.messages: list[Message] = []
        self.cache = self.model.make_cache(**vars(self.cache_options))
        self._tokens = np.zeros(0, dtype=np.int64)  # identity of each cached token
        self._inputs: ModelInputs | None = None  # the last turn's (without pixels)
        self._features: dict[str, mx.array] = {}  # media key -> merged vision features
        self.answer_start = 0  # where the last answer's tokens begin in the cache
        self._history_bytes = 0  # of messages and _inputs (`_count_history`)

    @property
    def cached_tokens(self) -> int:
        return len(self._tokens)

    @property
    def nbytes(self) -> int:
        """What this conversation holds: its KV cache, the vision features of its media and
        its history (`history_bytes`). Pixels are not kept once a turn has encoded them."""
        features = sum(f.nbytes for f in self._features.values())
        return self.cache.nbytes + features + self.history_bytes

    @property
    def history_bytes(self) -> int:
        """What the history holds besides the cache and the features: the token ids, the text
        of the messages and of the last prompt, and the pixels of media not encoded (a turn
        that ended before the vision tower ran, an old saved file's history)."""
        return self._tokens.nbytes + self._history_bytes

    @property
    def opens_thinking(self) -> bool:
        """Whether the last turn's prompt opened <think> (its answer starts inside reasoning)."""
        return self._inputs is not None and self._inputs.opens_thinking

    @property
    def notices(self) -> tuple[str, ...]:
        """What preparing the last turn's new media changed (a video fitted to its token
        budget), one sentence each."""
        return () if self._inputs is None else self._inputs.notices

    def save(self, path: str | Path) -> Path:
        """Write the conversation, cache included, to one safetensors file (see
        `conversation.file`); `Conversation.load` resumes it, in this process or another."""
        options = {
            "prompt": dataclasses.asdict(self.prompt_options),
            "max_kv_size": self.max_kv_size,
            "drop_old_turns": self.drop_old_turns,
        }
        self._settle()
        saved = SavedConversation(self.messages, self._tokens, self.cache, options, self._features)
        return save_conversation(saved, self.model, path)

    @classmethod
    def load(
        cls, path: str | Path, model: Model, processor: Processor, **overrides
    ) -> Conversation:
        """A conversation saved by `save`, for the model that saved it; `overrides` replace the
        saved settings (keyword arguments of `Conversation`), but not how its cache is stored:
        cache options given (kv_bits, ...) must be the file's (its cache was computed so)."""
        saved = load_conversation(path, model)
        given = pop_cache_options(overrides)
        cache = CacheOptions(**given)
        if given and cache != saved.cache.options:
            stored = saved.cache.options
            raise MimoError(
                f"{path} holds a cache stored {stored.describe()}, not {cache.describe()} as "
                f"asked: load it with the cache options it was saved with ({stored.flags()})"
            )
        settings = {
            "max_kv_size": saved.options["max_kv_size"],
            "drop_old_turns": saved.options["drop_old_turns"],
            **saved.options["prompt"],
            **vars(saved.cache.options),
            **overrides,
        }
        chat = cls(model, processor, **settings)
        chat.messages, chat._tokens, chat.cache = saved.messages, saved.tokens, saved.cache
        chat._features = dict(saved.features)
        chat._count_history()
        return chat

    def ask(self, content: str | list, images=(), videos=(), **kwargs) -> GenerationResult:
        """Add a user turn and return the whole answer (reasoning apart); see `stream`."""
        return collect(self.stream(content, images, videos, **kwargs)).with_inputs(self._inputs)

    def stream(
        self,
        content: str | list,
        images: Sequence[ImageInput] | ImageInput = (),
        videos: Sequence[str | Path] | str | Path = (),
        **kwargs,
    ) -> Iterator[GenerationResponse]:
        """Add a user turn (text or a list of parts; images, then videos, then the text) and
        stream the answer, which joins the history. Keyword arguments as in `stream_messages`."""
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        media = [{"type": "image", "image": x} for x in _as_list(images, "images")]
        media += [{"type": "video", "video": x} for x in _as_list(videos, "videos")]
        turn = {"role": "user", "content": [*media, *parts]}
        yield from self.stream_messages([*self.messages, turn], **kwargs)

    def stream_messages(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        sampler: Sampler | None = None,
        logits_processors: Sequence[LogitsProcessor] | None = None,
        prefill_step_size: int = DEFAULT_PREFILL_STEP,
        **options,
    ) -> Iterator[GenerationResponse]:
        """Answer a whole conversation (the OpenAI message shape; see `messages.py`), reusing the
        longest prefix this cache holds. Afterwards `messages` plus the answer are the history,
        also when the caller stops reading early (the answer so far is kept).

        `options`: sampling options, prompt-lookup options (`options.LookupOptions`: drafts
        copy from the whole conversation), prompt options that override the conversation's
        for this turn (e.g. max_pixels), `tools` (OpenAI's function definitions, shown to the
        model through its chat template) and `json_schema` (the answer is JSON valid against
        it, enforced while decoding; see `stream_generate`).
        """
        started = time.perf_counter()
        turn = self.prepare(messages, options.pop("tools", None), **pop_prompt_options(options))
        yield from self.stream_turn(
            turn,
            started=started,
            max_tokens=max_tokens,
            sampler=sampler,
            logits_processors=logits_processors,
            prefill_step_size=prefill_step_size,
            **options,
        )

    def prepare(
        self, messages: Sequence[Message], tools: Sequence[dict] | None = None, **prompt_options
    ) -> Turn:
        """A turn ready to run: the messages (fitted to max_kv_size), their inputs and the
        identity of their tokens. Depends only on the messages, the tools offered (OpenAI's
        function definitions, shown by the chat template) and the options, not on what this
        conversation holds, so one turn can be offered to several conversations."""
        options = PromptOptions(**{**vars(self.prompt_options), **prompt_options})
        messages, inputs = self._fitted(list(messages), options, tools)
        # A conversation encodes media item by item (`media`); the stacked copies go now.
        inputs = dataclasses.replace(inputs, pixel_values=None, pixel_values_videos=None)
        return Turn(messages, inputs, token_identity(inputs, self.model.config))

    def prepare_text(self, prompt: str) -> Turn:
        """A raw turn: `prompt` tokenized as it is, without the chat template (a plain text
        completion, as /v1/completions asks for); its answer is not added to `messages`."""
        if not isinstance(prompt, str) or not prompt:
            raise MimoError("the prompt is empty")
        # A prompt surely too long is refused before it is tokenized at all.
        found = self.processor.tokenizer.surely_exceeds(prompt, self.max_kv_size - 1)
        ids = None if found else np.array([self.processor.tokenizer.encode(prompt)], np.int64)
        length = found or ids.shape[1]
        if length >= self.max_kv_size:
            raise ContextFull(
                f"the prompt is {'at least ' if found else ''}{length} tokens but at most "
                f"{self.max_kv_size} fit (--max-kv-size, or the model's context)",
                tokens=length,
                limit=self.max_kv_size,
            )
        return Turn([], ModelInputs(ids, text=prompt), ids[0].copy(), raw=True)

    def shared_prefix(self, turn: Turn) -> int:
        """How many of the turn's tokens this conversation would reuse."""
        return self._reusable(turn.identity)

    def fork(self, length: int, cache_options: CacheOptions | None = None) -> Conversation:
        """A new conversation holding this one's first `length` cached tokens (and no history:
        the next turn brings its own messages); this one is left as it is. `cache_options`
        (with `length` 0 only) store the new one's cache otherwise."""
        if cache_options is not None and cache_options != self.cache_options and length:
            raise MimoError("a fork keeps its parent's cache options unless it starts empty")
        other = Conversation.__new__(Conversation)
        other.__dict__.update(self.__dict__)
        if cache_options is not None:
            other.cache_options = cache_options
        other.reset()
        if length:
            other.cache = self.cache.copy(length)
        other._tokens = self._tokens[: other.cache.offset].copy()
        other._features = dict(self._features)  # shared arrays; the next turn keeps its own
        other.answer_start = 0
        return other

    def stream_turn(
        self,
        turn: Turn,
        *,
        started: float | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        sampler: Sampler | None = None,
        logits_processors: Sequence[LogitsProcessor] | None = None,
        prefill_step_size: int = DEFAULT_PREFILL_STEP,
        json_schema: dict | None = None,
        output_format: OutputFormat | None = None,
        **sampling,
    ) -> Iterator[GenerationResponse]:
        """Stream the answer to a prepared turn, continuing this conversation's cache. The answer
        follows `output_format` (`generation.constrained`), or is JSON valid against
        `json_schema`."""
        lookup = PromptLookup.from_options(pop_lookup_options(sampling), cost=self.lookup_cost)
        start = self.begin_turn(
            turn,
            started=started,
            max_tokens=max_tokens,
            json_schema=json_schema,
            output_format=output_format,
            **sampling,
        )
        sampler, logits_processors = _sampling(start.sampling, sampler, logits_processors)
        generated: list[int] = []
        mx.reset_peak_memory()
        try:  # end_turn runs however this ends: pixels never outlive the turn
            for response in stream_prompt(
                self.model,
                self.processor.tokenizer,
                start.prompt(),
                self.cache,
                started=start.started,
                max_tokens=start.max_tokens,
                sampler=sampler,
                logits_processors=logits_processors,
                prefill_step_size=prefill_step_size,
                cached_tokens=start.cached_tokens,
                lookup=lookup,
                context=start.context,
                constraint=start.constraint,
            ):
                generated.append(response.token)
                yield response
        finally:
            if lookup is not None:
                self.lookup_cost = lookup.cost  # the next turns need not measure it again
            self.end_turn(turn, generated)

    def begin_turn(
        self,
        turn: Turn,
        *,
        started: float | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        json_schema: dict | None = None,
        output_format: OutputFormat | None = None,
        **sampling,
    ) -> TurnStart:
        """Get ready to answer `turn`: the cache trimmed to what the turn shares with it, and
        what generating the rest needs (`TurnStart`). `end_turn` must follow, whatever happens;
        `stream_turn` does both around its generation, a batch around its row."""
        if max_tokens < 1:
            raise MimoError(f"max_tokens must be at least 1, got {max_tokens}")
        if json_schema is not None:
            if output_format is not None:
                raise MimoError("give json_schema or output_format, not both")
            output_format = json_format(json_schema)
        started = time.perf_counter() if started is None else started
        options = SamplingOptions(**sampling)
        inputs, identity = turn.inputs, turn.identity
        constraint = make_constraint(self.model, self.processor.tokenizer, output_format, inputs)
        self._settle()
        keep = self._reusable(identity)
        self.cache.trim(self.cache.offset - keep)
        self._tokens = self._tokens[:keep]
        self._inputs = inputs
        self.answer_start = len(identity)
        return TurnStart(
            prompt_steps=lambda max_tokens=None: self._suffix_prompt(
                inputs, identity, keep, max_tokens
            ),
            cache=self.cache,
            cached_tokens=keep,
            max_tokens=min(max_tokens, self.max_kv_size - len(identity)),
            constraint=constraint,
            context=inputs.input_ids[0],
            sampling=options,
            started=started,
        )

    def end_turn(self, turn: Turn, generated: Sequence[int]) -> None:
        """After `begin_turn`: the history takes the turn and the answer as far as it got (none:
        as if the turn was never sent); the cache holds the same, however generation ended."""
        messages, inputs, identity = turn.messages, turn.inputs, turn.identity
        # Whatever happened (done, stopped early, interrupted anywhere), the cache holds a
        # prefix of this prompt and the answer as far as it got; the history says the same.
        self._tokens = np.concatenate([identity, generated])
        self._settle()
        self._keep_features(inputs)
        self.messages = with_media(messages, self._inputs.media)
        if turn.raw:
            pass  # a plain completion is not a chat turn
        elif generated:
            answer = [t for t in generated if t not in self.processor.tokenizer.eos_token_ids]
            text = self.processor.tokenizer.decode(answer, skip_special_tokens=True)
            self.messages.append({"role": "assistant", "content": text})
        else:
            self.messages.pop()  # no answer at all: as if the turn was never sent
        self._count_history()

    def _count_history(self) -> None:
        """Count what `messages` and `_inputs` hold (`history_bytes`), once each time they
        change: a pool asks for every conversation's bytes after each request."""
        media: dict[int, PreparedMedia] = {}
        total = _held_bytes(self.messages, media)
        if self._inputs is not None:
            total += self._inputs.input_ids.nbytes + sys.getsizeof(self._inputs.text)
            media.update((id(m), m) for m in self._inputs.media)
        held = (m.pixel_values for m in media.values() if m.pixel_values is not None)
        self._history_bytes = total + sum(pixels.nbytes for pixels in held)

    def _settle(self) -> None:
        """Make the cache and `_tokens` agree: both cut to what both hold. A turn stopped
        anywhere (Ctrl-C during the prompt, a token, or this bookkeeping itself) leaves the cache
        holding a prefix of what was fed, and `_tokens` the identity of at least that much."""
        length = self.cache.truncate(len(self._tokens))
        self._tokens = self._tokens[:length]

    def _keep_features(self, inputs: ModelInputs) -> None:
        """Keep the vision features of this turn's media, not their pixels (an item whose
        features this conversation never saw, from an old saved file, keeps its pixels)."""
        keys = {m.key for m in inputs.media}
        self._features = {k: f for k, f in self._features.items() if k in keys}
        media = tuple(
            m.encoded(self._features[m.key], self.model) if m.key in self._features else m
            for m in inputs.media
        )
        self._inputs = dataclasses.replace(inputs, media=media)

    # ---------------------------------------------------------------- the prompt of a turn

    def _fitted(
        self, messages: list[Message], options: PromptOptions, tools: Sequence[dict] | None
    ) -> tuple[list[Message], ModelInputs]:
        """The messages and their inputs, leaving room for at least one answer token."""
        limit = self.max_kv_size - 1
        while True:
            try:
                inputs = self.processor.prepare_messages(
                    messages, tools=tools, max_tokens=limit, **vars(options)
                )
                length, at_least = inputs.input_ids.shape[1], ""
            except ContextFull as err:  # surely too long, found before tokenizing all of it
                length, at_least = err.tokens, "at least "
            if length <= limit:
                return messages, inputs
            shorter = _without_oldest_exchange(messages) if self.drop_old_turns else None
            if shorter is None:
                advice = (
                    "start over (/reset in chat) or drop the oldest turns (--drop-old-turns)"
                    if not self.drop_old_turns
                    else "the last message alone does not fit: shorten it or send smaller media"
                )
                raise ContextFull(
                    f"the conversation is {at_least}{length} tokens but at most {self.max_kv_size} fit "
                    f"(--max-kv-size, or the model's context); {advice}",
                    tokens=length,
                    limit=self.max_kv_size,
                )
            messages = shorter

    def _reusable(self, identity: np.ndarray) -> int:
        """How many cached tokens the new prompt starts with; at least one token is computed
        afresh (its logits start the answer), and never from inside an image or video."""
        common = min(len(self._tokens), len(identity))
        differ = np.flatnonzero(self._tokens[:common] != identity[:common])
        keep = min(int(differ[0]) if len(differ) else common, len(identity) - 1)
        while 0 < keep and identity[keep] < 0 and identity[keep - 1] == identity[keep]:
            keep -= 1
        return keep

    def _suffix_prompt(
        self, inputs: ModelInputs, identity: np.ndarray, keep: int, max_tokens: int | None = None
    ) -> Iterator[Prompt | None]:
        """The prompt from token `keep` on: the vision features of the media that start there
        (from the vision cache) and positions continuing the cache. Yields None after each
        piece of the vision tower (`VisionCache.features_in_steps`, pieces of at most
        `max_tokens` merged tokens; None: one pass for everything), then the prompt."""
        by_code = {media_code(m.key): m for m in inputs.media}
        suffix = identity[keep:]
        starts = np.flatnonzero((suffix < 0) & (np.concatenate([[1], suffix[:-1]]) != suffix))
        new_media = [by_code[int(suffix[i])] for i in starts]  # one per placeholder run, in order
        for step in self._media_features(new_media, max_tokens):
            if step is None:
                yield None
            else:
                features = step
        images = [m for m in new_media if m.kind == "image"]
        videos = [m for m in new_media if m.kind == "video"]
        yield self.model.prepare_prompt(
            inputs.input_ids[:, keep:],
            image_grid_thw=_grids(images),
            video_grid_thw=_grids(videos),
            second_per_grid_ts=[m.second_per_grid_t for m in videos] or None,
            cache=self.cache,
            vision_features=mx.concatenate(features) if features else None,
        )

    def _media_features(
        self, media: list[PreparedMedia], max_tokens: int | None = None
    ) -> Iterator[list[mx.array] | None]:
        """Features of each item: this conversation's own, those the item carries from this
        model (another conversation's history), else the vision cache's (which encodes what it
        lacks); all kept for the turn's history. Yields None after each piece of the tower
        (pieces of at most `max_tokens` merged tokens, `VisionCache.features_in_steps`; None:
        one pass), then the features."""
        for item in media:
            carried = item.features_for(self.model)
            if item.key not in self._features and carried is not None:
                self._features[item.key] = carried
        missing = [m for m in media if m.key not in self._features]
        if any(m.pixel_values is None for m in missing):
            raise MimoError(
                "an image of these messages was encoded by another model and kept no pixels: "
                "give the image itself"
            )
        if max_tokens is None:
            encoded = self.vision_cache.features(self.model, missing)
        else:
            for step in self.vision_cache.features_in_steps(self.model, missing, max_tokens):
                if step is not None:
                    encoded = step
                    break
                yield None
        for item, features in zip(missing, encoded, strict=True):
            self._features[item.key] = features
        yield [self._features[m.key] for m in media]


def media_code(key: str) -> int:
    """The identity of an image's or video's placeholder tokens: negative (token ids are not),
    60 bits of its content key, so the same media compare equal in any conversation."""
    return -1 - int(key[:15], 16)


def token_identity(inputs: ModelInputs, config) -> np.ndarray:
    """Token ids, with each image/video placeholder replaced by its media's code: two prompts
    share a prefix exactly when they share these."""
    ids = inputs.input_ids[0].copy()
    for token_id, kind in ((config.image_token_id, "image"), (config.video_token_id, "video")):
        items = [m for m in inputs.media if m.kind == kind]
        if not items:
            continue
        counts = [int(np.prod(m.grid_thw)) // config.vision.merge_unit for m in items]
        codes = np.array([media_code(m.key) for m in items], dtype=np.int64)
        ids[ids == token_id] = np.repeat(codes, counts)
    return ids


def _held_bytes(value, media: dict[int, PreparedMedia]) -> int:
    """The bytes of the strings in a message structure (what Python holds for them); its
    media are gathered into `media` by identity (a history and a prompt share them)."""
    if isinstance(value, str):
        return sys.getsizeof(value)
    if isinstance(value, PreparedMedia):
        media[id(value)] = value
        return 0
    if isinstance(value, dict):
        return sum(_held_bytes(item, media) for item in value.values())
    if isinstance(value, list | tuple):
        return sum(_held_bytes(item, media) for item in value)
    return 0


def _grids(media: list[PreparedMedia]) -> np.ndarray | None:
    return np.array([m.grid_thw for m in media], dtype=np.int64) if media else None


def _without_oldest_exchange(messages: list[Message]) -> list[Message] | None:
    """The messages without the oldest user turn and the answer to it (system kept); None when
    only the last turn is left."""
    first = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
    turns = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if first is None or len(turns) < 2:
        return None
    return messages[:first] + messages[turns[1] :]
