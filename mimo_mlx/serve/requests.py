"""OpenAI's chat-completions requests, checked and turned into what the library takes, and its
error objects (`responses` builds the answers). No HTTP and no MLX here.

Unknown fields are ignored, as OpenAI does; a known field of the wrong type or out of range is an
error that names it (`param`). OpenAI options this server cannot honour (n > 1, presence and
frequency penalties, logit_bias, the deprecated functions) are refused with a message, never
silently ignored. Tools and response_format are checked by `tools.py` (`tools.parse_chat`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..options import KV_BITS, KV_GROUP_SIZES

if TYPE_CHECKING:  # MLX stays out of request checking
    from ..generation.constrained import OutputFormat

MAX_STOP = 4  # OpenAI's limit on stop sequences
DEFAULT_MAX_IMAGES = 16  # per request, the whole conversation counted (videos too)
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON can carry half a UTF-16 pair
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_SEED = 2**63 - 1
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
MAX_REPETITION_PENALTY = 2.0  # vLLM's bound; more than that only garbles the answer


class APIError(Exception):
    """An error answered as OpenAI does: an HTTP status and {"error": {message, type, param, code}}."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = (
            message,
            status,
            type,
            param,
            code,
        )

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class MediaRef:
    """An image or video a request points at (data: URL, http(s) URL or local path), not yet
    read; `param` says where in the request it was, for errors."""

    kind: Literal["image", "video"]
    url: str
    param: str


@dataclass(frozen=True)
class Limits:
    """What requests to this server may ask for."""

    model_ids: tuple[str, ...]  # the names the served model answers to, its id first
    context: int  # the model's context, in tokens
    max_pixels: int | None = None  # the largest per-request max_pixels (the checkpoint's)
    any_model: bool = False  # answer whatever model a request names (one model is served)
    max_images: int = DEFAULT_MAX_IMAGES  # images and videos in one request, all turns counted


@dataclass(frozen=True)
class ChatRequest:
    """A checked chat-completions request. `messages` are in the library's shape, their media
    parts holding `MediaRef`s; `sampling`, `prompt` and `cache` hold only the options the
    request set."""

    messages: list[dict]
    max_tokens: int | None
    sampling: dict[str, Any]
    prompt: dict[str, Any]
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    top_logprobs: int | None  # None: no logprobs asked; 0: the chosen token's only
    model: str | None
    tools: Any = None  # `tools.Tools` offered (None also for tool_choice "none")
    output_format: OutputFormat | None = None  # what the answer must be (response_format, ...)
    cache: dict[str, Any] = field(default_factory=dict)  # kv_bits, kv_group_size, ...

    @property
    def media(self) -> list[MediaRef]:
        """Every image and video of the request, in order of appearance."""
        return [
            part[part["type"]]
            for message in self.messages
            for part in message["content"]
            if part["type"] in ("image", "video")
        ]


# ---------------------------------------------------------------- fields


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _wrong_type(name: str, expected: str, value: Any) -> APIError:
    return APIError(
        f"'{name}' must be {expected}, got {_type_name(value)}", param=name, code="invalid_type"
    )


def _out_of_range(name: str, rule: str, value: Any) -> APIError:
    return APIError(f"'{name}' must be {rule}, got {value!r}", param=name, code="invalid_value")


def _integer(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(name, "an integer", value)
    if not low <= value <= high:
        raise _out_of_range(name, f"between {low} and {high}", value)
    return value


def _number(body: dict, name: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _wrong_type(name, "a number", value)
    if not (math.isfinite(value) and (low < value if low_open else low <= value) and value <= high):
        bracket = "(" if low_open else "["
        raise _out_of_range(name, f"in {bracket}{low}, {high}]", value)
    return float(value)


def _boolean(body: dict, name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise _wrong_type(name, "a boolean", value)
    return value


def _object(body: dict, name: str) -> dict:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _wrong_type(name, "an object", value)
    return value


# ---------------------------------------------------------------- messages

ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}


def _messages(value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise APIError(
            "'messages' must be a non-empty array of {role, content} objects",
            param="messages",
            code="invalid_value" if isinstance(value, list) else "missing_required_parameter",
        )
    return [_message(message, f"messages[{i}]") for i, message in enumerate(value)]


def _message(message: Any, where: str) -> dict:
    if not isinstance(message, dict):
        raise _wrong_type(where, "an object with role and content", message)
    role = message.get("role")
    if role not in ROLES:
        raise APIError(
            f"'{where}.role' must be system, developer, user, assistant or tool, got {role!r}",
            param=f"{where}.role",
        )
    content = message.get("content")
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif content is None and role == "assistant":
        parts = []
    elif isinstance(content, list):
        parts = [_part(part, f"{where}.content[{j}]") for j, part in enumerate(content)]
    else:
        raise _wrong_type(f"{where}.content", "a string or an array of content parts", content)
    if ROLES[role] != "user" and any(part["type"] != "text" for part in parts):
        raise APIError(f"{where}: images and videos go in user messages", param=f"{where}.content")
    return {"role": ROLES[role], "content": parts, **_tool_fields(message, where)}


def _tool_fields(message: dict, where: str) -> dict:
    """A tool result's `tool_call_id`; an assistant's `tool_calls` (arguments as JSON text, as
    OpenAI sends them)."""
    fields: dict[str, Any] = {}
    if message["role"] == "tool":
        if not isinstance(message.get("tool_call_id"), str):
            raise _wrong_type(f"{where}.tool_call_id", "a string", message.get("tool_call_id"))
        fields["tool_call_id"] = message["tool_call_id"]
    calls = message.get("tool_calls")
    if calls is None:
        return fields
    if message["role"] != "assistant" or not isinstance(calls, list):
        raise _wrong_type(f"{where}.tool_calls", "an array, in an assistant message", calls)
    checked = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}].function"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _wrong_type(f"{at}.name", "a string", None)
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):
            raise _wrong_type(f"{at}.arguments", "a string (JSON)", arguments)
        call_id = call.get("id") if isinstance(call.get("id"), str) else f"call_{j}"
        checked.append({"id": call_id, "type": "function", "function": dict(function)})
    return {**fields, "tool_calls": checked}


def _part(part: Any, where: str) -> dict:
    """A content part as the library takes it; media as a `MediaRef`."""
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise _wrong_type(where, "an object with a 'type'", part)
    kind = part["type"]
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise _wrong_type(f"{where}.text", "a string", part.get("text"))
        return {"type": "text", "text": part["text"]}
    if kind in ("image_url", "video_url", "image", "video"):
        media = kind.removesuffix("_url")
        value = part.get(kind)
        url = value.get("url") if kind.endswith("_url") and isinstance(value, dict) else value
        param = f"{where}.{kind}.url" if isinstance(value, dict) else f"{where}.{kind}"
        if not isinstance(url, str) or not url:
            raise _wrong_type(param, "a URL string", url)
        return {"type": media, media: MediaRef(media, url, param)}
    raise APIError(
        f"'{where}.type' {kind!r} is not supported (use text, image_url or video_url)",
        param=f"{where}.type",
    )


# ---------------------------------------------------------------- the request


def _refuse_unsupported(body: dict) -> None:
    """OpenAI options that would change the answer and that this server cannot honour."""
    n = body.get("n")
    if n is not None and n != 1:
        raise APIError("'n' must be 1: this server writes one answer per request", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, -2.0, 2.0):
            raise APIError(
                f"'{name}' is not supported; use repetition_penalty (> 1 discourages repeats)",
                param=name,
            )
    if body.get("logit_bias"):
        raise APIError("'logit_bias' is not supported", param="logit_bias")


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _wrong_type("stop", "a string or an array of strings", value)
    if len(stops) > MAX_STOP:
        raise _out_of_range("stop", f"at most {MAX_STOP} sequences", value)
    if any(not s for s in stops):
        raise APIError("'stop' sequences must not be empty", param="stop", code="invalid_value")
    return tuple(stops)


def _sampling(body: dict) -> dict[str, Any]:
    found = {
        "temp": _number(body, "temperature", 0.0, MAX_TEMPERATURE),
        "top_p": _number(body, "top_p", 0.0, 1.0),
        "top_k": _integer(body, "top_k", -1, 2**31 - 1),
        "min_p": _number(body, "min_p", 0.0, 1.0),
        "repetition_penalty": _number(
            body, "repetition_penalty", 0.0, MAX_REPETITION_PENALTY, low_open=True
        ),
        "seed": _integer(body, "seed", 0, MAX_SEED),
    }
    if found["top_k"] == -1:  # vLLM's way to say "disabled"
        found["top_k"] = 0
    return {name: value for name, value in found.items() if value is not None}


def _prompt_options(body: dict, limits: Limits) -> dict[str, Any]:
    ceiling = limits.max_pixels or 2**31 - 1
    found = {
        "min_pixels": _integer(body, "min_pixels", 1, ceiling),
        "max_pixels": _integer(body, "max_pixels", 1, ceiling),
    }
    if None not in found.values() and found["min_pixels"] > found["max_pixels"]:
        raise APIError("'min_pixels' must not exceed 'max_pixels'", param="min_pixels")
    thinking = _boolean(_object(body, "chat_template_kwargs"), "enable_thinking")
    if thinking is not None:
        found["no_think"] = not thinking
    return {name: value for name, value in found.items() if value is not None}


def _cache_options(body: dict, limits: Limits) -> dict[str, Any]:
    """How this request's conversation cache is stored (mlx-lm's names; the server's flags set
    the default): kv_bits 4 or 8, kv_group_size 32, 64 or 128, quantized_kv_start."""
    found = {
        "kv_bits": _integer(body, "kv_bits", 0, 2**31 - 1),
        "kv_group_size": _integer(body, "kv_group_size", 0, 2**31 - 1),
        "quantized_kv_start": _integer(body, "quantized_kv_start", 0, limits.context),
    }
    for name, allowed in (("kv_bits", KV_BITS), ("kv_group_size", KV_GROUP_SIZES)):
        if found[name] is not None and found[name] not in allowed:
            rule = " or ".join(map(str, allowed))
            raise _out_of_range(name, rule, found[name])
    return {name: value for name, value in found.items() if value is not None}


def refuse_lone_surrogates(body: Any) -> None:
    """Every string of a decoded JSON body (keys too) must be text: JSON's escapes can carry half
    of a UTF-16 surrogate pair, which no tokenizer, path or URL can take. APIError 400 names
    the field."""
    stack: list[tuple[Any, str]] = [(body, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and _SURROGATE.search(value):  # isascii: O(1), no scan
                name = where or "the request body"
                raise APIError(
                    f"'{name}' holds a lone UTF-16 surrogate (half of a character), which is not "
                    "text; send valid Unicode",
                    param=where or None,
                    code="invalid_value",
                )
        elif isinstance(value, dict):
            for key, item in value.items():
                stack.append((key, where or "the request body"))
                stack.append((item, f"{where}.{key}" if where else key))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(value))


def check_model(body: dict, limits: Limits) -> str | None:
    """The request's `model`: one of the names the server answers to (any, unless it was
    started with --model-name), else APIError 404 as OpenAI answers a model it does not have."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _wrong_type("model", "a string", model)
    if model == "":
        raise APIError(
            f"'model' is empty; this server runs {limits.model_ids[0]!r}",
            param="model",
            code="invalid_value",
        )
    if model is not None and not limits.any_model and model not in limits.model_ids:
        raise APIError(
            f"the model {model!r} is not served here; this server runs {limits.model_ids[0]!r} "
            "(GET /v1/models lists it)",
            404,
            param="model",
            code="model_not_found",
        )
    return model


def parse_chat_request(body: Any, limits: Limits) -> ChatRequest:
    """Check a decoded chat-completions body; APIError names the first problem (400; 404 for a
    model this server does not run). Tools and response_format are left to `tools.parse_chat`."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    model = check_model(body, limits)
    if "messages" not in body:
        raise APIError(
            "'messages' is required", param="messages", code="missing_required_parameter"
        )
    messages = _messages(body["messages"])
    media = sum(part["type"] != "text" for message in messages for part in message["content"])
    if media > limits.max_images:
        raise APIError(
            f"the conversation holds {media} images and videos; this server takes at most "
            f"{limits.max_images} per request",
            param="messages",
            code="too_many_images",
        )
    _refuse_unsupported(body)
    max_tokens = _integer(body, "max_completion_tokens", 1, limits.context)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1, limits.context)
    stream = bool(_boolean(body, "stream"))
    stream_options = _object(body, "stream_options")
    if stream_options and not stream:
        raise APIError(
            "'stream_options' is only allowed when 'stream' is true", param="stream_options"
        )
    logprobs = bool(_boolean(body, "logprobs"))
    top_logprobs = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top_logprobs is not None and not logprobs:
        raise APIError("'top_logprobs' needs 'logprobs' set to true", param="top_logprobs")
    return ChatRequest(
        messages=messages,
        max_tokens=max_tokens,
        sampling=_sampling(body),
        prompt=_prompt_options(body, limits),
        stop=_stop(body),
        stream=stream,
        include_usage=bool(_boolean(stream_options, "include_usage")),
        top_logprobs=(top_logprobs or 0) if logprobs else None,
        model=model,
        cache=_cache_options(body, limits),
    )
