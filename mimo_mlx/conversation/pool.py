"""Many clients' conversations at once, within a byte budget: what a server keeps between requests.

A client re-sends its whole conversation with every request. The pool offers the prepared turn to
each conversation it holds and continues the one that shares the longest prefix with it, so turn 2
reuses turn 1's tokens and images whichever client sent it. Where continuing would trim tokens
before that conversation's last answer (two clients with the same start, a client that edited its
history), the conversation is forked at the shared prefix instead, and kept. A request may ask for
its cache to be stored otherwise than the pool's default (kv_bits, ...): it continues only a
conversation stored that way.

The budget bounds everything kept between requests: each conversation's KV cache (the bytes it
holds, quantized or not), the vision features of its images (never their pixels, but for a turn
that ended before they were encoded: those are counted) and its history (token ids and text),
and the pool's own vision cache, which may use a quarter of it. After each request, conversations are
dropped, least recently used first, until the total fits; the one just used too if it alone does
not (features shared between a conversation and the vision cache count twice: the bound errs on
the safe side).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

from ..generation.loop import GenerationResponse
from ..inputs.messages import Message
from ..inputs.processor import Processor
from ..model.mimo_vl import Model
from ..options import CacheOptions, pop_cache_options, pop_prompt_options
from .conversation import Conversation, Turn, TurnStart
from .vision_cache import VisionCache

DEFAULT_POOL_BYTES = 2 * 2**30  # about 14k cached tokens of MiMo-VL-7B in bfloat16


class ConversationPool:
    """Cached conversations of any number of clients; used by one generation thread at a time."""

    def __init__(
        self,
        model: Model,
        processor: Processor,
        *,
        max_bytes: int = DEFAULT_POOL_BYTES,
        vision_cache: VisionCache | None = None,
        max_kv_size: int | None = None,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
        quantized_kv_start: int = 0,
        **prompt_options,
    ) -> None:
        """`kv_bits`, `kv_group_size` and `quantized_kv_start` are the default cache options
        (requests may ask for others); `prompt_options` the default prompt options."""
        self.max_bytes = max_bytes
        cache = vision_cache if vision_cache is not None else VisionCache(max_bytes // 4)
        self.vision_cache = cache
        self._blank = Conversation(
            model,
            processor,
            vision_cache=cache,
            max_kv_size=max_kv_size,
            kv_bits=kv_bits,
            kv_group_size=kv_group_size,
            quantized_kv_start=quantized_kv_start,
            **prompt_options,
        )
        self._entries: list[Conversation] = []  # least recently used first
        self._running: Conversation | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def model(self) -> Model:
        return self._blank.model

    @property
    def nbytes(self) -> int:
        """Bytes held between requests: conversations (KV, vision features, history) and the
        vision cache."""
        return sum(entry.nbytes for entry in self._entries) + self.vision_cache.nbytes

    def stats(self) -> dict:
        """What /health reports about the memory kept: KV caches, vision features (the
        conversations' and the vision cache's) and histories (token ids, text, and pixels of
        media a turn ended without encoding)."""
        kv = sum(entry.cache.nbytes for entry in self._entries)
        history = sum(entry.history_bytes for entry in self._entries)
        total = self.nbytes
        return {
            "conversations": len(self._entries),
            "bytes": total,
            "limit": self.max_bytes,
            "kv_bytes": kv,
            "vision_bytes": total - kv - history,
            "history_bytes": history,
        }

    @property
    def opens_thinking(self) -> bool:
        """Whether the running turn's prompt opened <think> (its answer starts inside the
        reasoning); known once `stream` has yielded its first response."""
        return self._running is not None and self._running.opens_thinking

    @property
    def notices(self) -> tuple[str, ...]:
        """What preparing the running turn's new media changed (a video fitted to its token
        budget); known once `stream` has yielded its first response."""
        return () if self._running is None else self._running.notices

    def stream(self, messages: Sequence[Message], **options) -> Iterator[GenerationResponse]:
        """Answer `messages` (the OpenAI shape), continuing the best-matching conversation.
        `options` as for `Conversation.stream_messages`, and cache options (`kv_bits`, ...) over
        the pool's defaults."""
        stored = self._stored(options)
        with self._lock:
            tools = options.pop("tools", None)
            turn = self._blank.prepare(messages, tools, **pop_prompt_options(options))
            yield from self._stream_turn(turn, stored, options)

    def stream_text(self, prompt: str, **options) -> Iterator[GenerationResponse]:
        """Complete a plain text `prompt` (no chat template), reusing cached tokens as `stream`
        does. `options` as for `Conversation.stream_turn`, and cache options over the pool's."""
        stored = self._stored(options)
        with self._lock:
            turn = self._blank.prepare_text(prompt)
            yield from self._stream_turn(turn, stored, options)

    def prepare(
        self, messages: Sequence[Message] | None = None, prompt: str | None = None, **options
    ) -> tuple[Turn, dict]:
        """The first half of `begin`: the chat `messages` (or a plain text `prompt`) as a turn
        (the chat template, the media decoded and preprocessed), and the options `begin` still
        takes. It reads no conversation and no MLX array, so it may run on another thread while
        the generation thread steps a batch: a long video's frames are decoded meanwhile."""
        tools = options.pop("tools", None)
        if prompt is not None:
            return self._blank.prepare_text(prompt), options
        return self._blank.prepare(messages, tools, **pop_prompt_options(options)), options

    def begin(
        self,
        messages: Sequence[Message] | None = None,
        prompt: str | None = None,
        *,
        turn: Turn | None = None,
        **options,
    ) -> tuple[Conversation, Turn, TurnStart]:
        """A turn taken out of the pool to run in a batch: the chat `messages` (or a plain text
        `prompt`, or a `turn` from `prepare` with the options it left) given to the
        best-matching conversation, which leaves the pool until `end` brings it back (a running
        turn is never continued by another). `options` as for `stream`, less the sampler and
        processors the caller makes from `TurnStart.sampling` (and prompt lookup, which a batch
        does not do), and cache options over the pool's."""
        if turn is None:
            turn, options = self.prepare(messages, prompt, **options)
        stored = self._stored(options)
        with self._lock:
            chat = self._conversation_for(turn, stored, keep=False)
            try:
                return chat, turn, chat.begin_turn(turn, **options)
            except BaseException:
                self._entries.append(chat)
                raise

    def end(self, chat: Conversation, turn: Turn, generated: Sequence[int]) -> None:
        """A turn from `begin` is over (`generated`: its answer as far as it got, its cache
        holding as much): the conversation returns to the pool as the most recently used."""
        with self._lock:
            chat.end_turn(turn, generated)
            self._entries.append(chat)
            self._evict()

    def _stored(self, options: dict) -> CacheOptions:
        """The cache options a request asks for (taken out of `options`) over the pool's."""
        return CacheOptions(**{**vars(self._blank.cache_options), **pop_cache_options(options)})

    def _stream_turn(
        self, turn, stored: CacheOptions, options: dict
    ) -> Iterator[GenerationResponse]:
        """With the lock held: `turn` answered by the best-matching conversation, which stays
        in the pool; the pool is trimmed to its budget afterwards, however the turn ended."""
        chat = self._running = self._conversation_for(turn, stored)
        try:
            yield from chat.stream_turn(turn, **options)
        finally:
            self._running = None
            self._evict()

    def _conversation_for(self, turn, stored: CacheOptions, keep: bool = True) -> Conversation:
        """The conversation to continue with `turn`, among those stored as `stored` says; it
        stays in the pool (as the most recently used) unless `keep` is False."""
        scored = [
            (entry.shared_prefix(turn), entry)
            for entry in self._entries
            if entry.cache_options == stored
        ]
        shared, best = max(scored, key=lambda pair: pair[0], default=(0, None))
        if best is None or shared == 0:
            chat = self._blank.fork(0, stored)
        elif shared < best.answer_start:
            # Another conversation with the same start: best keeps what it holds for whoever
            # comes back to it. (Parting inside best's last answer is its own client going on:
            # the answer's text re-tokenizes differently, and the old tail is of no use.)
            chat = best.fork(shared)
        else:
            chat = best
            self._entries.remove(best)
        if keep:
            self._entries.append(chat)
        return chat

    def _evict(self) -> None:
        while self.nbytes > self.max_bytes and self._entries:
            self._entries.pop(0)  # least recently used first; the one just used is last
