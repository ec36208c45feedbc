"""Tool calls in an answer, as Qwen2.5's chat template asks the model to write them:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Oslo"}}
    </tool_call>

`ToolCallStream` takes the answer's text as it streams and gives back the text around the calls
and each call once its block is closed. A block that is not a call to one of the offered tools
(bad JSON, an unknown name, cut off by max_tokens) stays in the text as it was written, so
nothing the model wrote is lost.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    """One call: the function's name and its arguments as JSON text (OpenAI's shape)."""

    name: str
    arguments: str


def parse_call(block: str, names: frozenset[str] | None = None) -> ToolCall | None:
    """The call in one block's body ({"name": ..., "arguments": {...}}); None if it is not one
    (or names a tool not in `names`)."""
    try:
        body = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        return None
    if names is not None and body["name"] not in names:
        return None
    arguments = body.get("arguments", body.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as JSON text already
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(body["name"], json.dumps(arguments, ensure_ascii=False))


def _partial(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is the start of `tag`."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ToolCallStream:
    """Splits streamed answer text into (text, calls). `names`: the tools offered (None: any
    name); `limit`: the most calls taken (then `done`: the caller ends the answer). Whitespace
    around a call is layout and is dropped."""

    def __init__(self, names: Iterable[str] | None = None, limit: int | None = None) -> None:
        self.names = None if names is None else frozenset(names)
        self.limit = limit
        self.calls: list[ToolCall] = []
        self._buffer = ""
        self._inside = False  # within a <tool_call> block
        self._after_call = False  # whitespace here follows a call: dropped

    @property
    def done(self) -> bool:
        return self.limit is not None and len(self.calls) >= self.limit

    def feed(self, piece: str) -> tuple[str, list[ToolCall]]:
        """Add answer text; return the text and the calls that became certain."""
        self._buffer += piece
        text, calls = [], []
        while not self.done:
            if not self._inside:
                at = self._buffer.find(OPEN)
                if at < 0:
                    # Hold what may start a tag, and whitespace (it may come before a call).
                    tag = _partial(self._buffer, OPEN)
                    body = self._buffer[: len(self._buffer) - tag].rstrip()
                    text.append(self._text(body))
                    self._buffer = self._buffer[len(body) :]
                    break
                text.append(self._text(self._buffer[:at].rstrip()))
                self._buffer, self._inside = self._buffer[at:], True
            end = self._buffer.find(CLOSE)
            if end < 0:
                break  # the block is not closed yet
            block = self._buffer[: end + len(CLOSE)]
            self._buffer, self._inside = self._buffer[end + len(CLOSE) :], False
            call = parse_call(block[len(OPEN) : -len(CLOSE)], self.names)
            if call is None:
                text.append(self._text(block))
            else:
                calls.append(call)
                self.calls.append(call)
                self._after_call = True
        return "".join(text), calls

    def finish(self) -> str:
        """The end of the answer: what was held back (an unclosed block is text)."""
        text, self._buffer, self._inside = self._buffer, "", False
        return "" if self.done else self._text(text)

    def _text(self, text: str) -> str:
        if self._after_call:
            text = text.lstrip()
            self._after_call = not text
        return text
