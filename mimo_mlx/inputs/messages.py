"""Chat messages in the shapes people send them: checked, and split into text for the template and
the media to preprocess.

Accepted, per message: `role` system, user, assistant or tool; `content` a string or a list of
parts (an assistant message with `tool_calls` may have none; a tool result may carry
`tool_call_id` and `name`):

    {"type": "text", "text": "..."}
    {"type": "image", "image": PATH | PIL.Image}                      (transformers)
    {"type": "image_url", "image_url": {"url": "data:image/...;base64,..." | PATH}}   (OpenAI)
    {"type": "video", "video": PATH}                                  (transformers, mlx-vlm)
    {"type": "video_url", "video_url": {"url": PATH}}                 (vLLM)

Remote URLs are not fetched here: a caller that allows them (the server) downloads them first.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from ..errors import MimoError
from .image_files import decode_image
from .template import NO_THINK, Message, user_text

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Media:
    """One image or video of a conversation, as given (a path, a PIL image, ...)."""

    kind: Literal["image", "video"]
    source: Any


def split_messages(
    messages: Sequence[Message], system: str | None = None, no_think: bool = False
) -> tuple[list[Message], list[Media]]:
    """(messages for the chat template, media in order of appearance).

    Media parts become `{"type": "image"}` / `{"type": "video"}`; text-only content becomes a plain
    string (which every ChatML template renders). `system` replaces or adds the system message;
    `no_think` appends MiMo's "/no_think" to the last user message. An assistant's `tool_calls`
    keep OpenAI's shape with their arguments as objects (as chat templates expect them).
    """
    if isinstance(messages, dict | str) or not isinstance(messages, Sequence) or not messages:
        raise MimoError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    rendered, media = [], []
    for index, message in enumerate(messages):
        role, parts = _check_message(message, index)
        content = []
        for part in parts:
            kind, value = _part(part, index)
            if kind == "text":
                content.append({"type": "text", "text": value})
            else:
                content.append({"type": kind})
                media.append(Media(kind, value))
        if role != "user" and any(part["type"] != "text" for part in content):
            raise MimoError(f"messages[{index}]: images and videos go in user messages")
        rendered.append({"role": role, "content": content, **_tool_fields(message, index)})
    if no_think:
        _append_no_think(rendered)
    if system is not None:
        rendered = [m for m in rendered if m["role"] != "system"]
        rendered.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    return [_plain(m) for m in rendered], media


def _check_message(message: Any, index: int) -> tuple[str, list]:
    if not isinstance(message, dict):
        raise MimoError(f"messages[{index}] must be an object with role and content")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise MimoError(f"messages[{index}].role must be one of {', '.join(ROLES)}, got {role!r}")
    if isinstance(content, str):
        return role, [{"type": "text", "text": content}]
    if content is None and (role == "assistant" or message.get("tool_calls")):
        return role, []
    if not isinstance(content, list):
        raise MimoError(f"messages[{index}].content must be a string or a list of parts")
    return role, content


def _tool_fields(message: dict, index: int) -> dict[str, Any]:
    """A tool result's `tool_call_id` and `name`; an assistant's `tool_calls`, checked."""
    fields = {k: message[k] for k in ("tool_call_id", "name") if isinstance(message.get(k), str)}
    calls = message.get("tool_calls")
    if calls is None:
        return fields
    if message["role"] != "assistant" or not isinstance(calls, list):
        raise MimoError(f"messages[{index}].tool_calls must be a list, in an assistant message")
    return {**fields, "tool_calls": [_tool_call(call, index) for call in calls]}


def _tool_call(call: Any, index: int) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise MimoError(f"messages[{index}]: each tool call needs function.name")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):  # OpenAI sends the arguments as JSON text
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            pass  # the template shows it as it was written
    out = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return {"id": call["id"], **out} if isinstance(call.get("id"), str) else out


def _part(part: Any, index: int) -> tuple[str, Any]:
    """(kind, value) of one content part: ("text", str) or ("image" | "video", source)."""
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise MimoError(f"messages[{index}]: each content part needs a 'type'")
    kind = part["type"]
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise MimoError(f"messages[{index}]: a text part needs 'text' as a string")
        return "text", part["text"]
    if kind in ("image", "video") and kind in part:
        return kind, part[kind]
    if kind in ("image_url", "video_url"):
        url = part.get(kind)
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str) or not url:
            raise MimoError(f"messages[{index}]: an {kind} part needs {kind}.url")
        media = kind.removesuffix("_url")
        return media, image_from_url(url) if media == "image" else _local(url)
    raise MimoError(
        f"messages[{index}]: unsupported content part {kind!r} (use text, image, image_url, "
        "video or video_url)"
    )


def image_from_url(url: str) -> Image.Image | Path:
    """A data: URL decoded to an image, or a local path (plain or file://)."""
    if not url.startswith("data:"):
        return _local(url)
    header, _, data = url.partition(",")
    if not header.endswith(";base64") or not data:
        raise MimoError("an image data URL must be base64: data:image/png;base64,...")
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise MimoError("the image data URL is not valid base64") from None
    return decode_image(decoded, "the image data URL")


def _local(url: str) -> Path:
    if url.startswith(("http://", "https://")):
        raise MimoError(f"{url}: remote URLs are not fetched here; download the file first")
    return Path(url.removeprefix("file://")).expanduser()


def _append_no_think(messages: list[Message]) -> None:
    last = next((m for m in reversed(messages) if m["role"] == "user"), None)
    if last is None:
        return
    texts = [p for p in last["content"] if p["type"] == "text"]
    if texts:
        texts[-1]["text"] = user_text(texts[-1]["text"], no_think=True)
    else:
        last["content"].append({"type": "text", "text": NO_THINK})


def _plain(message: Message) -> Message:
    """Text-only content as one string, as llama.cpp's MiMo-VL template needs."""
    parts = message["content"]
    if all(p["type"] == "text" for p in parts):
        return {**message, "content": "".join(p["text"] for p in parts)}
    return message


def with_media(messages: Sequence[Message], prepared: Sequence[Any]) -> list[Message]:
    """`messages` (already checked by `split_messages`) with the i-th image/video part, in order of
    appearance, holding `prepared[i]` in the transformers shape ({"type": "image", "image": ...}).
    """
    items = iter(prepared)
    out = []
    for index, message in enumerate(messages):
        role, parts = _check_message(message, index)
        content = []
        for part in parts:
            kind = part["type"].removesuffix("_url")
            content.append(part if kind == "text" else {"type": kind, kind: next(items)})
        out.append({**message, "role": role, "content": content})
    return out
