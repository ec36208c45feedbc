"""Prompt-lookup decoding: drafts copied from the text seen, verified in one forward pass.

OCR, document and GUI answers repeat long runs of the prompt (or of the answer so far). After each
token the last `ngram_size` tokens (then fewer, down to one) are looked up among the tokens seen,
and what followed them there is the draft, up to `num_tokens` long. The model runs the last token
and the draft in one forward pass (text continuing the cache: M-RoPE positions are equal on all
axes and continue at the cache's offset plus its rope delta) and samples a token after each of
them with the caller's own sampler and logits processors. Draft token i is accepted while the
token sampled at its position equals it; the first token that differs, or the one after a fully
accepted draft, is the model's own. The cache is then trimmed back by the rejected tokens,
rotary bookkeeping included.

Why this is exact: at every position the emitted token is a draw from the very distribution plain
decoding draws from (the warped distribution p, the processors having seen the same tokens). For a
deterministic draft d that is the standard speculative rule: d is accepted with probability p(d),
and on rejection the token is distributed as p with d removed and renormalized. Greedy: the argmax,
token for token.

How long a draft is depends on what a pass over more tokens costs on this device (`pass_cost`):
the first time a draft is wanted the cost is measured (or the caller gives it), and each draft is
as long as the expected tokens per unit of cost are highest, for the acceptance rate seen so far.
Where no draft length can pay (MLX's CPU 4-bit matmul costs a decode step per row) the lookup
never drafts: decoding is plain decoding and costs what it costs without lookup. A measured cost
is also checked against decoding itself: each verification's time over the fastest plain step
seen is what that pass really cost, and when two verifications in a row cost more than the cost
promised, the cost is raised to it (`PassCost.scaled`); drafts then shorten, or stop where none
can pay (a pass can cost more than its matmuls say: see `pass_cost`).

When drafts keep failing (`MISS_LIMIT` verifications in a row with nothing accepted) drafting stops:
decoding goes on as plain pipelined steps, and the lookup is only tried on the host against the
tokens as they come (a free probe). Once it would have been right `HIT_LIMIT` times in a row,
drafting resumes. Decoding starts that way too, so a prompt with nothing to copy costs a dictionary
lookup per token. Plain steps are queued before the previous token is read, as in `generate_step`;
a draft needs the token on the host first, so a step that verifies waits for its input.
"""

from __future__ import annotations

import time
import warnings
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator

import mlx.core as mx
import mlx.nn as nn

from ..model.backend import device_kind, release_cache
from ..model.cache import PromptCache
from ..options import LookupOptions
from .pass_cost import PassCost

MISS_LIMIT = 2  # verifications in a row that accept nothing before drafting stops
HIT_LIMIT = 2  # host-side lookups in a row that would have been right before it resumes
PRIOR = (3, 1)  # accepted and rejected drafts assumed before any is verified: acceptance 0.75

Step = Callable[..., tuple[mx.array, mx.array]]
"""step(history, input_ids=(1, L)) -> (token sampled after each input (L,), log-probs (L, vocab)),
queued for evaluation. `history` holds every token fed so far and the first of `input_ids` (None
without processors)."""


def accepted_count(draft: list[int], sampled: list[int]) -> int:
    """How many draft tokens the model confirms: draft[i] stands while the token sampled at its
    position (`sampled[i]`, drawn after the tokens before it) equals it."""
    for i, token in enumerate(draft):
        if sampled[i] != token:
            return i
    return len(draft)


def warn_if_no_faster(model: nn.Module) -> None:
    """Warn where verification cannot pay: MLX's CPU quantized matmul is a loop over rows (a draft
    of n tokens costs n decode steps there), unlike Metal, CUDA or float32 with a threaded BLAS."""
    if device_kind() == "cpu" and isinstance(
        model.model.layers[0].mlp.down_proj, nn.QuantizedLinear
    ):
        warnings.warn(
            "prompt lookup with a quantized model on the CPU is not faster: MLX's CPU quantized "
            "matmul costs a whole decode step for every drafted token (the output is the same; "
            "a GPU, or a float model with a threaded BLAS, gains)",
            stacklevel=3,
        )


class NgramIndex:
    """Where every n-gram (n <= max_ngram) of the tokens seen was followed by another token.

    `propose` looks up the last n tokens, longest n first, and copies what followed them: the first
    occurrence at or after `cursor` (where the copy in progress goes on), else the one just before
    it. A fresh index's cursor is 0, so its first lookup takes the earliest occurrence, as
    transformers does. Tokens in `blocked` (image and video placeholders) are never drafted or
    matched.
    """

    def __init__(self, max_ngram: int, blocked: Iterable[int] = ()) -> None:
        self.max_ngram = max_ngram
        self.blocked = frozenset(blocked)
        self.tokens: list[int] = []
        self.cursor = 0
        self._starts: dict[tuple[int, ...], list[int]] = {}  # n-gram -> where its followers are
        self._last_blocked = -1

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            self.append(int(token))

    def append(self, token: int) -> None:
        """Add the next token; the n-grams ending just before it now have a continuation."""
        i = len(self.tokens)
        self.tokens.append(token)
        if token in self.blocked:
            self._last_blocked = i
            return  # no draft starts with a placeholder
        for n in range(1, min(self.max_ngram, i - self._last_blocked - 1) + 1):
            self._starts.setdefault(tuple(self.tokens[i - n : i]), []).append(i)

    def propose(self, limit: int) -> tuple[list[int], int]:
        """Up to `limit` tokens that followed the last n-gram elsewhere, and where they start
        (([], -1) when no n-gram of the tail was seen before)."""
        if limit < 1:
            return [], -1
        tokens = self.tokens
        for n in range(min(self.max_ngram, len(tokens)), 0, -1):
            starts = self._starts.get(tuple(tokens[-n:]))
            if not starts:
                continue
            k = bisect_left(starts, self.cursor)
            start = starts[k] if k < len(starts) else starts[-1]
            draft = tokens[start : start + limit]
            for j, token in enumerate(draft):
                if token in self.blocked:
                    return draft[:j], start
            return draft, start
        return [], -1


class PromptLookup:
    """Prompt-lookup decoding for one generation: drafting, verification, backoff and counters.

    drafted: draft tokens verified; accepted: those the model confirmed that were yielded (with
    from_draft; a caller stopping at an end token inside a draft does not get the rest);
    passes: forward passes that produced tokens (the prompt's last one included), so
    tokens / passes is the tokens per pass; verifications: passes that checked a draft.
    `drafting` starts False (watching); set it before decoding to verify from the first token.
    `cost` sizes the drafts (`pass_cost.PassCost`); None: measured when a draft is first wanted
    (by `decode`'s `measure`), then kept, so a caller can hand it to the next turn's lookup.
    `seconds` says where the time went: drafting (host lookups), verifying (from queueing a
    verification pass to its tokens on the host), trimming (the cache), measuring (the cost).
    """

    def __init__(
        self, num_tokens: int = 10, ngram_size: int = 2, cost: PassCost | None = None
    ) -> None:
        LookupOptions(prompt_lookup_num_tokens=num_tokens, max_matching_ngram_size=ngram_size)
        self.num_tokens, self.ngram_size, self.cost = num_tokens, ngram_size, cost
        self.drafted = self.accepted = self.passes = self.verifications = 0
        self.confirmed, self.rejected = PRIOR  # draft tokens confirmed, drafts cut short
        self.seconds = dict.fromkeys(("drafting", "verifying", "trimming", "measuring"), 0.0)
        self.step_s: float | None = None  # the fastest plain decode step seen, host to host
        self._observed: list[float] = []  # each verification's time in plain steps
        self.drafting = False  # start by watching: nothing is drafted until lookups prove right
        self.misses = self.hits = 0
        self.index = NgramIndex(ngram_size)
        self._prediction: tuple[int, int] | None = None  # (token, where it was copied from)

    @classmethod
    def from_options(
        cls, options: LookupOptions, cost: PassCost | None = None
    ) -> PromptLookup | None:
        """The lookup the options ask for (drafts sized by `cost`); None when they leave it off."""
        if not options.enabled:
            return None
        return cls(num_tokens=options.num_tokens, ngram_size=options.ngram_size, cost=cost)

    def begin(self, context: Iterable[int], blocked: Iterable[int] = ()) -> None:
        """Index the tokens already seen (the whole prompt, earlier turns included); `blocked`
        ids (image/video placeholders) are never drafted."""
        self.index = NgramIndex(self.ngram_size, blocked)
        self.index.extend(context)
        self._predict()

    def decode(
        self,
        step: Step,
        token: mx.array,
        logprobs: mx.array,
        cache: PromptCache,
        max_tokens: int,
        history: mx.array | None = None,
        measure: Callable[[int], PassCost] | None = None,
    ) -> Iterator[tuple[int, mx.array, bool]]:
        """Yield (token, log-probabilities, from_draft) for up to `max_tokens` tokens, starting
        with `token` (1,) / `logprobs` (1, vocab) from the prompt's last pass (not yet fed).
        `measure(rows)` gives the pass cost when none was given (without either, drafts are
        `num_tokens` long).

        If the caller stops early, the cache is trimmed to hold no token it was not given.
        """
        clock = time.perf_counter
        # `token` is always the model's own choice (from the prompt, a plain step, or the one
        # after a verified draft); accepted draft tokens go straight to `pending`.
        start, yielded, pending, verify = cache.offset, 0, [], self.drafting
        read_at = None  # when the last plain step's token reached the host
        self.passes += 1
        try:
            while True:
                decided = yielded + len(pending) + 1  # tokens decided, this one included
                more, draft, source = decided < max_tokens, [], -1
                if verify:  # read this token first: the draft continues it
                    value, read_at = token.item(), None  # not a pipelined step: not timed
                    if more and self.cost is None and measure is not None:
                        self._measure(measure)
                    began = clock()
                    self.index.append(value)
                    if more:
                        limit = self._limit(max_tokens - decided - 1)
                        draft, source = self.index.propose(limit)
                    self.seconds["drafting"] += clock() - began
                if more:  # one pass: this token and the draft (plain: queued before the read)
                    if history is not None:
                        history = mx.concatenate([history, token.astype(history.dtype)])
                    inputs = mx.array([[value, *draft]]) if draft else token[:, None]
                    queued_at = clock()
                    queued = step(history, input_ids=inputs)  # being evaluated
                    self.passes += 1
                if not verify:
                    value = token.item()
                    began = clock()
                    if read_at is not None:  # a plain step after a plain step: its time
                        self._plain_step(began - read_at)
                    read_at = began
                    verify = self._watch(value)
                    self.seconds["drafting"] += clock() - began
                elif not draft:
                    verify = False  # nothing to copy here: plain steps from now on
                pending.append((value, logprobs[0], False))
                for item in pending:
                    yielded += 1
                    self.accepted += item[2]
                    yield item
                    release_cache(yielded)
                pending.clear()
                if not more:
                    return
                if not draft:
                    token, logprobs = queued
                    continue
                sampled, rows = queued
                chosen = sampled.tolist()
                began = clock()
                self.seconds["verifying"] += began - queued_at
                self._verification_took(len(draft) + 1, began - queued_at)
                read_at = None
                count = accepted_count(draft, chosen)
                cache.trim(len(draft) - count)  # the rejected tail, rotary bookkeeping included
                self.seconds["trimming"] += clock() - began
                self._verified(len(draft), count, source)
                for i in range(count):
                    self.index.append(draft[i])
                    pending.append((draft[i], rows[i], True))
                if history is not None and count:
                    history = mx.concatenate([history, mx.array(draft[:count], history.dtype)])
                token, logprobs = mx.array([chosen[count]]), rows[count : count + 1]
                verify = self.drafting
        finally:
            excess = cache.offset - (start + yielded)
            if excess > 0:
                cache.trim(excess)

    def _measure(self, measure: Callable[[int], PassCost]) -> None:
        """Measure the pass cost (once); say so if no draft can pay here."""
        began = time.perf_counter()
        self.cost = measure(self.num_tokens + 1)
        self.seconds["measuring"] += time.perf_counter() - began
        if not self.cost.pays:
            rows = len(self.cost.ratios)
            _no_draft_pays(
                f"drafts nothing here: a pass over {rows} tokens costs "
                f"{self.cost.ratios[-1]:.1f} decode steps on this device (measured)"
            )

    def _plain_step(self, seconds: float) -> None:
        self.step_s = seconds if self.step_s is None else min(self.step_s, seconds)

    def _verification_took(self, rows: int, seconds: float) -> None:
        """Check a measured cost against a verification pass over `rows` tokens that took
        `seconds`; the least of the last two (one may include compiling its kernels) raises the
        cost when above it. A cost given as fixed (no measured counts: `PassCost.flat`) stays."""
        cost = self.cost
        if cost is None or not cost.measured or self.step_s is None or rows > len(cost.ratios):
            return
        self._observed = [*self._observed[-1:], seconds / self.step_s]
        if len(self._observed) < 2:
            return
        paid = self.cost.pays
        self.cost = self.cost.scaled(rows, min(self._observed))
        if paid and not self.cost.pays:
            _no_draft_pays(
                f"stopped drafting: a verification pass over {rows} tokens cost "
                f"{min(self._observed):.1f} decode steps here (measured while decoding)"
            )

    def _limit(self, room: int) -> int:
        """How many tokens to draft now, at most `room`: the length the pass cost and the
        acceptance so far favour."""
        limit = min(self.num_tokens, room)
        if self.cost is None:
            return limit
        acceptance = self.confirmed / (self.confirmed + self.rejected)
        return self.cost.draft_length(acceptance, limit)

    def _verified(self, drafted: int, accepted: int, source: int) -> None:
        """Count a verification; after MISS_LIMIT that accept nothing, stop drafting."""
        self.drafted += drafted
        self.confirmed += accepted
        self.rejected += accepted < drafted
        self.verifications += 1
        self.index.cursor = source + accepted + 1
        self.misses = self.misses + 1 if accepted == 0 else 0
        if self.misses >= MISS_LIMIT:
            self.drafting, self.hits = False, 0
            self._prediction = None

    def _watch(self, token: int) -> bool:
        """Take a token decoded by a plain step; whether the next token should verify a draft.

        While not drafting, the lookup's guess for this token is checked against it (on the host,
        at no cost); HIT_LIMIT right guesses in a row resume drafting.
        """
        if not self.drafting and self._prediction is not None:
            guess, source = self._prediction
            self.hits = self.hits + 1 if token == guess else 0
            self.index.cursor = source + 1
        self.index.append(token)
        never = self.cost is not None and not self.cost.pays  # no draft can pay on this device
        if not self.drafting and self.hits >= HIT_LIMIT and not never:
            self.drafting, self.misses = True, 0
        found = self._predict()
        return self.drafting and found

    def _predict(self) -> bool:
        draft, source = self.index.propose(1)
        self._prediction = (draft[0], source) if draft else None
        return bool(draft)


def _no_draft_pays(why: str) -> None:
    """Warn (from the caller's caller's caller: the code iterating over the tokens) that lookup
    decodes plainly from now on, and why."""
    warnings.warn(
        f"prompt lookup {why}, so no draft can be faster; decoding goes on as without it",
        stacklevel=5,
    )
