"""Token sampling on MLX: logits processors (repetition penalty) and samplers (greedy,
temperature, top-k, top-p, min-p).

Semantics follow transformers' generate: processors first, then TemperatureLogitsWarper,
TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper, in that order, each masking to -inf, then a
categorical draw. Everything stays on the device as MLX ops over (B, vocab) logits; seed with
`mx.random.seed` before generating.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx

from ..errors import MimoError
from ..options import SamplingOptions

Sampler = Callable[[mx.array], mx.array]
"""(B, vocab) float logits -> (B,) token ids."""
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]
"""(tokens so far: (L,) or (B, L), logits: (B, vocab)) -> logits."""

_NEG_INF = float("-inf")


def greedy(logits: mx.array) -> mx.array:
    """The most likely token of each row: the argmax, which logits and log-probabilities share,
    so generation gives it the logits and normalizes only when the log-probabilities are read."""
    return mx.argmax(logits, axis=-1)


def apply_temperature(logits: mx.array, temperature: float) -> mx.array:
    """Divide by the temperature (a division, like transformers, so results match bit for bit)."""
    return logits / temperature


def apply_top_k(logits: mx.array, top_k: int) -> mx.array:
    """Keep the `top_k` largest logits per row (and ties with the k-th), mask the rest to -inf."""
    if top_k >= logits.shape[-1]:
        return logits
    kth = mx.topk(logits, top_k, axis=-1).min(axis=-1, keepdims=True)  # (B, 1)
    return mx.where(logits < kth, _NEG_INF, logits)


def apply_top_p(logits: mx.array, top_p: float) -> mx.array:
    """Nucleus filter: drop the least likely tokens whose total probability is at most 1 - top_p."""
    ascending = mx.sort(logits, axis=-1)  # (B, V)
    cumulative = mx.cumsum(mx.softmax(ascending, axis=-1), axis=-1)
    # Dropped tokens form a prefix of the ascending order; the most likely token always stays.
    dropped = (cumulative <= 1 - top_p).sum(axis=-1, keepdims=True)  # (B, 1)
    dropped = mx.minimum(dropped, logits.shape[-1] - 1)
    threshold = mx.take_along_axis(ascending, dropped, axis=-1)  # smallest kept logit
    return mx.where(logits < threshold, _NEG_INF, logits)


def apply_min_p(logits: mx.array, min_p: float, min_tokens_to_keep: int = 1) -> mx.array:
    """Drop tokens less likely than min_p times the most likely one (compared in log space),
    keeping at least the `min_tokens_to_keep` most likely."""
    top = logits.max(axis=-1, keepdims=True)
    threshold = top + math.log(min_p)
    if min_tokens_to_keep > 1:
        keep = min(min_tokens_to_keep, logits.shape[-1])
        kth = mx.topk(logits, keep, axis=-1).min(axis=-1, keepdims=True)
        threshold = mx.minimum(threshold, kth)
    return mx.where(logits < threshold, _NEG_INF, logits)


def make_warper(
    temp: float = 1.0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
    top_k: int = 0,
) -> Callable[[mx.array], mx.array]:
    """The logits -> warped logits function a sampler draws from (for tests and inspection).

    Filters run in transformers' order: temperature, top-k, top-p, min-p. top_p 0 or 1, top_k 0
    and min_p 0 disable their filter.
    """
    steps: list[Callable[[mx.array], mx.array]] = []
    if temp != 1.0:
        steps.append(lambda x: apply_temperature(x, temp))
    if top_k > 0:
        steps.append(lambda x: apply_top_k(x, top_k))
    if 0.0 < top_p < 1.0:
        steps.append(lambda x: apply_top_p(x, top_p))
    if min_p > 0.0:
        steps.append(lambda x: apply_min_p(x, min_p, min_tokens_to_keep))

    def warp(logits: mx.array) -> mx.array:
        logits = logits.astype(mx.float32)
        for step in steps:
            logits = step(logits)
        return logits

    return warp


def make_sampler(
    temp: float = 0.0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
    top_k: int = 0,
    seed: int | None = None,
) -> Sampler:
    """A function from (B, vocab) logits or log-probabilities to (B,) sampled ids (mlx-lm's names).

    temp 0 is greedy (argmax; the filters do not matter then). top_p 0 or 1, top_k 0 and min_p 0
    disable their filter. MiMo's recommendation: temp 0.3, top_p 0.95; greedy for evaluations.

    Without a `seed` the draws come from MLX's global random state (`mx.random.seed`). With one,
    the sampler keeps a random state of its own: its draws are the ones the global state would
    give after `mx.random.seed(seed)`, whatever else draws meanwhile (several sequences sampled
    in one batch each get their own).
    """
    SamplingOptions(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed)  # validates
    if not (isinstance(min_tokens_to_keep, int) and min_tokens_to_keep >= 1):
        raise MimoError(f"min_tokens_to_keep must be an integer >= 1, got {min_tokens_to_keep!r}")
    if temp == 0:
        return greedy
    # The warps are deterministic: compile them into one graph; the random draw stays outside.
    warp = mx.compile(make_warper(temp, top_p, min_p, min_tokens_to_keep, top_k))
    if seed is None:
        return lambda logits: mx.random.categorical(warp(logits), axis=-1)
    state = [mx.random.key(seed)]

    def sample(logits: mx.array) -> mx.array:
        # As MLX's global state does for each draw: split, keep one half, draw with the other.
        state[0], key = mx.random.split(state[0])
        return mx.random.categorical(warp(logits), axis=-1, key=key)

    return sample


def apply_repetition_penalty(logits: mx.array, tokens: mx.array, penalty: float) -> mx.array:
    """Penalize every id in `tokens` once: logit / penalty if positive, logit * penalty otherwise.

    `tokens` is (L,) (shared by all rows) or (B, L); ids beyond the logits' width cannot be sampled
    and are ignored, as in transformers' RepetitionPenaltyLogitsProcessor.
    """
    if tokens.size == 0:
        return logits
    batch, vocab = logits.shape
    if tokens.ndim == 1:
        tokens = mx.broadcast_to(tokens[None], (batch, tokens.shape[0]))  # (B, L)
    # A spare column absorbs out-of-range ids; duplicates write the same value, so scatter is safe.
    ids = mx.minimum(tokens.astype(mx.int32), vocab)
    padded = mx.concatenate([logits, mx.zeros((batch, 1), dtype=logits.dtype)], axis=-1)
    seen = mx.take_along_axis(padded, ids, axis=-1)  # (B, L)
    seen = mx.where(seen < 0, seen * penalty, seen / penalty)
    return mx.put_along_axis(padded, ids, seen, axis=-1)[:, :vocab]


def make_repetition_penalty(penalty: float, context_size: int | None = None) -> LogitsProcessor:
    """A processor penalizing the last `context_size` tokens (None: all, prompt included)."""
    SamplingOptions(repetition_penalty=penalty)  # validates
    if context_size is not None and context_size < 1:
        raise MimoError(f"repetition context size must be >= 1, got {context_size}.")

    def processor(tokens: mx.array, logits: mx.array) -> mx.array:
        recent = tokens if context_size is None else tokens[..., -context_size:]
        return apply_repetition_penalty(logits, recent, penalty)

    return processor


def make_logits_processors(
    repetition_penalty: float | None = None, context_size: int | None = None
) -> list[LogitsProcessor]:
    """Processors to run on the logits before sampling, given all tokens so far (prompt included).

    transformers penalizes the whole sequence (context_size None); mlx-lm uses a recent window.
    """
    if repetition_penalty is None or repetition_penalty == 1.0:
        return []
    return [make_repetition_penalty(repetition_penalty, context_size)]
