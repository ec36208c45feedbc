"""The JSON of OpenAI's chat-completion responses: whole answers, stream chunks, usage, llama.cpp's
timings, log-probabilities and model cards."""

from __future__ import annotations

import math
from typing import Any

NEGLIGIBLE_LOGPROB = -9999.0  # what OpenAI reports for a token with no probability at all


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def timings_body(
    prompt_n: int, prompt_s: float, predicted_n: int, predicted_s: float, cache_n: int
) -> dict:
    """llama.cpp's `timings`: prompt_n tokens computed in prompt_s (cache_n reused), then
    predicted_n tokens generated, the first at the end of prompt_s and the rest in predicted_s."""

    def rate(count: float, seconds: float) -> float:
        return count / seconds if seconds > 0 else 0.0

    steps = max(predicted_n - 1, 0)
    return {
        "cache_n": cache_n,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_s * 1e3,
        "prompt_per_token_ms": 1e3 * prompt_s / prompt_n if prompt_n else 0.0,
        "prompt_per_second": rate(prompt_n, prompt_s),
        "predicted_n": predicted_n,
        "predicted_ms": predicted_s * 1e3,
        "predicted_per_token_ms": 1e3 * predicted_s / steps if steps else 0.0,
        "predicted_per_second": rate(steps, predicted_s),
    }


def logprob_entry(
    token: str, token_bytes: bytes, logprob: float, top: list[tuple[str, bytes, float]] | None
) -> dict:
    """One token of `logprobs.content`: its text, its bytes (a byte-level token may hold part of
    a character: its text is then U+FFFD but its bytes are real, and consecutive tokens' bytes
    join into the answer) and its log-probability; `top` as (text, bytes, logprob) when asked."""

    def item(text: str, data: bytes, value: float) -> dict:
        value = value if math.isfinite(value) else NEGLIGIBLE_LOGPROB
        return {"token": text, "logprob": value, "bytes": list(data)}

    entry = item(token, token_bytes, logprob)
    entry["top_logprobs"] = [item(*pair) for pair in top or ()]
    return entry


def completion_body(
    id: str,
    created: int,
    model: str,
    *,
    content: str,
    reasoning: str,
    finish_reason: str,
    usage: dict,
    timings: dict,
    logprobs: list[dict] | None,
    tool_calls: list[dict] | None = None,
) -> dict:
    """A whole chat.completion; `tool_calls` as `tools.tool_call_entries` gives them (their
    stream `index` is dropped; with calls and no text, content is null as OpenAI sends it)."""
    message = {"role": "assistant", "content": content, "reasoning_content": reasoning or None}
    if tool_calls:
        message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in tool_calls]
        message["content"] = content or None
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None if logprobs is None else {"content": logprobs},
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage,
        "timings": timings,
    }


def chunk_body(
    id: str,
    created: int,
    model: str,
    delta: dict,
    *,
    finish_reason: str | None = None,
    logprobs: list[dict] | None = None,
    **extra: Any,
) -> dict:
    """One chat.completion.chunk; `extra` (usage, timings) goes beside the choices."""
    choice = {
        "index": 0,
        "delta": delta,
        "logprobs": None if logprobs is None else {"content": logprobs},
        "finish_reason": finish_reason,
    }
    body = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [choice],
    }
    return {**body, **extra}


def usage_chunk_body(id: str, created: int, model: str, usage: dict) -> dict:
    """The last chunk of a stream with include_usage: no choices, the usage."""
    return {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage,
    }


def model_card(id: str, created: int) -> dict:
    return {"id": id, "object": "model", "created": created, "owned_by": "mimo-mlx"}
