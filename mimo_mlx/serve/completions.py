"""OpenAI's legacy text completions (`POST /v1/completions`): a raw text prompt, no chat template
and no images, continued as it is (editors' completion plugins and older clients send these, and
mlx-lm's server answers them). The sampling fields, stop sequences, streaming and the cache
fields (kv_bits, ...) are the chat endpoint's; the answer's text is not split into reasoning and
content. No HTTP and no MLX here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .requests import (
    APIError,
    Limits,
    _boolean,
    _cache_options,
    _integer,
    _object,
    _refuse_unsupported,
    _sampling,
    _stop,
    _wrong_type,
    check_model,
)


@dataclass(frozen=True)
class CompletionRequest:
    """A checked completions request (the fields the chat endpoint's answer code reads, too)."""

    prompt: str
    max_tokens: int | None
    sampling: dict[str, Any]
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    echo: bool
    model: str | None
    cache: dict[str, Any] = field(default_factory=dict)  # kv_bits, kv_group_size, ...
    top_logprobs: None = None  # log-probabilities are not offered here


def _prompt(body: dict) -> str:
    value = body.get("prompt")
    if isinstance(value, list) and len(value) == 1:
        value = value[0]  # one prompt in an array, as some clients send it
    if not isinstance(value, str):
        raise _wrong_type(
            "prompt", "a string (token-id and batched prompts are not supported)", value
        )
    if not value:
        raise APIError("'prompt' is empty", param="prompt", code="invalid_value")
    return value


def parse_completion_request(body: Any, limits: Limits) -> CompletionRequest:
    """Check a decoded completions body; APIError names the first problem."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    model = check_model(body, limits)
    if "prompt" not in body:
        raise APIError("'prompt' is required", param="prompt", code="missing_required_parameter")
    prompt = _prompt(body)
    _refuse_unsupported(body)
    if body.get("suffix"):
        raise APIError("'suffix' (text inserted before a suffix) is not supported", param="suffix")
    if body.get("best_of") not in (None, 1):
        raise APIError("'best_of' must be 1: this server writes one answer", param="best_of")
    if body.get("logprobs") is not None:
        raise APIError(
            "'logprobs' is not supported on /v1/completions; /v1/chat/completions has them",
            param="logprobs",
        )
    stream = bool(_boolean(body, "stream"))
    stream_options = _object(body, "stream_options")
    if stream_options and not stream:
        raise APIError(
            "'stream_options' is only allowed when 'stream' is true", param="stream_options"
        )
    return CompletionRequest(
        prompt=prompt,
        max_tokens=_integer(body, "max_tokens", 1, limits.context),
        sampling=_sampling(body),
        stop=_stop(body),
        stream=stream,
        include_usage=bool(_boolean(stream_options, "include_usage")),
        echo=bool(_boolean(body, "echo")),
        model=model,
        cache=_cache_options(body, limits),
    )


def text_completion_body(
    id: str, created: int, model: str, text: str, finish_reason: str | None, **extra: Any
) -> dict:
    """A whole `text_completion`, or one chunk of a stream (the same object, as OpenAI sends
    it); `extra` (usage, timings) goes beside the choices."""
    choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
    body = {"id": id, "object": "text_completion", "created": created, "model": model}
    return {**body, "choices": [choice], **extra}
