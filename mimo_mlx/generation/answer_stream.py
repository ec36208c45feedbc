"""A streamed answer as an API returns it: stop sequences applied, reasoning and answer apart.

Text pieces go in as they are decoded; (reasoning, content) deltas come out. Joined, the deltas
equal `inputs.template.split_thinking` of the whole text (cut before the first stop sequence), so a streamed
answer and a whole one read the same: think tags never appear, each think block is stripped and
blocks are joined by a blank line, the answer is stripped. To get there without waiting for the
end, text that could still be the start of a stop sequence or of a tag is held back, and so is
whitespace until something follows it.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..inputs.template import ThinkingSplitter


def _partial(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is the start of `stop`."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-size:]):
            return size
    return 0


class _Stripped:
    """One channel's text with its ends stripped, streamed: leading whitespace is dropped,
    trailing whitespace is held until more text follows; `separator` goes between blocks."""

    def __init__(self, separator: str = "") -> None:
        self.separator = separator
        self.text = ""  # everything emitted
        self._pending = ""  # whitespace held back
        self._block_started = False

    def new_block(self) -> None:
        self._pending, self._block_started = "", False

    def add(self, piece: str) -> str:
        if not self._block_started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self._block_started = True
            self._pending = self.separator if self.text else ""
        body = piece.rstrip()
        if not body:
            self._pending += piece
            return ""
        out = self._pending + body
        self._pending = piece[len(body) :]
        self.text += out
        return out


class _Verbatim:
    """The splitter of a plain completion: all of it is answer, tags included."""

    def feed(self, piece: str) -> list[tuple[str, str]]:
        return [("answer", piece)] if piece else []

    def finalize(self) -> list[tuple[str, str]]:
        return []


class AnswerStream:
    """Turns decoded pieces into (reasoning, content) deltas; see the module docstring.

    `stop`: sequences that end the answer (matched on the raw text, tags included; not part of
    the answer). `opens_thinking`: the prompt already opened <think>. `raw`: the text is a plain
    completion (no chat template): it all goes to the content as written, stop sequences apart.
    """

    def __init__(
        self, stop: Sequence[str] = (), opens_thinking: bool = False, raw: bool = False
    ) -> None:
        self.raw = raw
        self._stops = tuple(s for s in stop if s)
        self._splitter = (
            _Verbatim() if raw else ThinkingSplitter(prompt_opened_thinking=opens_thinking)
        )
        self._held = ""  # raw text that may be the start of a stop sequence
        self._previous: str | None = None  # kind of the last segment, as split_thinking groups
        self.reasoning = _Stripped(separator="\n\n")
        self.content = _Stripped()
        self.stopped = False  # a stop sequence was found: the answer is complete

    def feed(self, piece: str) -> tuple[str, str]:
        """Add decoded text; return the (reasoning, content) that became certain."""
        if self.stopped:
            return "", ""
        text = self._held + piece
        found = [at for at in (text.find(s) for s in self._stops) if at >= 0]
        if found:
            self.stopped = True
            self._held = ""
            return self._route(self._splitter.feed(text[: min(found)]) + self._splitter.finalize())
        keep = max((_partial(text, s) for s in self._stops), default=0)
        self._held = text[len(text) - keep :] if keep else ""
        return self._route(self._splitter.feed(text[: len(text) - keep]))

    def finish(self) -> tuple[str, str]:
        """The end of the answer: flush what was held back (trailing whitespace is dropped)."""
        if self.stopped:
            return "", ""
        text, self._held = self._held, ""
        return self._route(self._splitter.feed(text) + self._splitter.finalize())

    def _route(self, segments: list[tuple[str, str]]) -> tuple[str, str]:
        if self.raw:
            return "", "".join(text for _, text in segments)
        reasoning, content = [], []
        for kind, text in segments:
            if kind == "thinking":
                if self._previous != "thinking":
                    self.reasoning.new_block()
                reasoning.append(self.reasoning.add(text))
            else:
                content.append(self.content.add(text))
            self._previous = kind
        return "".join(reasoning), "".join(content)
