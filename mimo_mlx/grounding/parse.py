"""Grounding: MiMo-VL's boxes, points and GUI actions, read from its answer and put back on the image.

MiMo-VL follows Qwen2.5-VL: after its reasoning it answers a grounding request with JSON such as

    ```json
    [{"bbox_2d": [222, 253, 348, 535], "label": "Poodle"}]
    ```

or, as a GUI agent, ``{"action": "drag", "start_point": [x, y], "end_point": [x, y]}``, always in
absolute pixels of the image *as the processor resized it* (Qwen2-VL's 0-1000 grid is gone).
Prompts seen in the wild ask for other shapes, which are read too: ``bbox`` for ``bbox_2d``,
objects nested under any key (``{"detections": [...]}``, ``{"keypoints": [...]}``,
``{"text_detections": [{"bbox": [...], "text": "EXIT"}]}``), ``text`` as an OCR box's label.
``parse_grounding`` reads those, plus Qwen's ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` text, and
never raises. ``grounding.report`` puts the coordinates back on the user's image and reports them.
No mlx here: this module runs anywhere.
"""

from __future__ import annotations

import ast
import bisect
import json
import math
import re
from dataclasses import dataclass
from typing import Any

# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixels, normalized so that x1 <= x2 and y1 <= y2."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str = ""


@dataclass(frozen=True)
class Point:
    """A point in pixels (``point_2d``, or where a GUI action starts or ends)."""

    x: float
    y: float
    label: str = ""


@dataclass(frozen=True)
class Action:
    """One GUI agent step: ``name`` (click, drag, input, ...), where it starts and ends, if anywhere.

    ``start``/``end`` are Points labelled with the action's name; ``arguments`` keeps the action's
    other fields (text, keys, direction, app, status, ...) in the order the model wrote them.
    """

    name: str
    start: Point | None = None
    end: Point | None = None
    arguments: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """The name with its most telling argument, e.g. 'input "hello"', 'press ctrl+c'."""
        details = dict(self.arguments)
        for key in ("text", "keys", "direction", "app", "status"):
            value = details.get(key)
            if isinstance(value, list):
                value = "+".join(str(v) for v in value)
            if value not in (None, ""):
                value = f'"{value}"' if key == "text" else value
                return f"{self.name} {value}".strip()
        return self.name


@dataclass(frozen=True)
class ImageGeometry:
    """One image's (width, height) as the user sees it (upright) and as the processor resized it."""

    original_size: tuple[int, int]
    resized_size: tuple[int, int]

    def __post_init__(self) -> None:
        for name in ("original_size", "resized_size"):
            size = getattr(self, name)
            if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
                raise ValueError(f"{name} must be (width, height) in positive pixels, got {size}")

    @classmethod
    def from_grid(
        cls, original_size: tuple[int, int], grid_thw: Any, patch_size: int = 14
    ) -> ImageGeometry:
        """The geometry preprocessing reported: its (t, h, w) patch grid times the patch size."""
        _, grid_h, grid_w = (int(v) for v in grid_thw)
        width, height = (int(v) for v in original_size)
        return cls((width, height), (grid_w * patch_size, grid_h * patch_size))

    @property
    def scale(self) -> tuple[float, float]:
        """Original pixels per resized pixel along x and y."""
        (width, height), (resized_w, resized_h) = self.original_size, self.resized_size
        return width / resized_w, height / resized_h

    def to_original(self, x: float, y: float) -> tuple[float, float]:
        """Resized-image pixels -> original-image pixels, clipped to [0, width] x [0, height]."""
        (width, height), (resized_w, resized_h) = self.original_size, self.resized_size
        return _clip(x * width / resized_w, width), _clip(y * height / resized_h, height)

    def to_resized(self, x: float, y: float) -> tuple[float, float]:
        """Original-image pixels -> resized-image pixels (the model's), clipped to that image."""
        (width, height), (resized_w, resized_h) = self.original_size, self.resized_size
        return _clip(x * resized_w / width, resized_w), _clip(y * resized_h / height, resized_h)


@dataclass(frozen=True)
class ParseResult:
    """What a grounding answer held, in the order it was written.

    ``geometry`` is None while coordinates are the model's (resized-image pixels); ``to_original``
    sets it to the image the coordinates now refer to. ``skipped`` says, one line each, what could
    not be read.
    """

    boxes: tuple[Box, ...] = ()
    points: tuple[Point, ...] = ()
    actions: tuple[Action, ...] = ()
    skipped: tuple[str, ...] = ()
    geometry: ImageGeometry | None = None


def _clip(value: float, limit: int) -> float:
    return min(max(value, 0.0), float(limit))


# ---------------------------------------------------------------- parsing

_TAGGED = re.compile(r"<\|(object_ref|box|point)_start\|>(.{0,400}?)<\|\1_end\|>", re.DOTALL)
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_TRAILING_COMMA = re.compile(r",\s*([\]}])")
_ACTION_KEYS = ("action", "action_name", "start_point", "end_point")
_BOX_KEYS = ("bbox_2d", "bbox")  # bbox: what many detection prompts ask for
_GROUNDING_KEYS = (*_BOX_KEYS, "point_2d", *_ACTION_KEYS)
_MAX_LITERAL = 100_000  # longest fragment handed to ast.literal_eval
# Brackets nested deeper than this are no grounding answer: trying to decode them only costs time.
_MAX_DEPTH = 32


def parse_grounding(answer: str) -> ParseResult:
    """Every box, point and GUI action in a model answer, in the model's (resized) pixels.

    Reads ``bbox_2d`` (or ``bbox``), ``point_2d`` and GUI actions (``start_point``/``end_point``)
    from JSON, fenced or bare, one object or a list, nested under any key, anywhere after the
    reasoning (``<think>`` blocks are dropped), and Qwen's
    ``<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`` text.
    Broken or cut-off JSON gives up only the objects that are incomplete; they are listed in
    ``skipped``. Never raises for any string.
    """
    if not isinstance(answer, str):
        return ParseResult(skipped=(f"expected the answer as text, got {type(answer).__name__}",))
    text, notes = _drop_reasoning(answer)
    reader = _Reader(text)
    reader.read_json()
    reader.read_tagged()
    return reader.result(notes)


def _drop_reasoning(text: str) -> tuple[str, list[str]]:
    kept, notes, position = [], [], 0
    while (start := text.find("<think>", position)) >= 0:  # a scan, not a regex: stays linear
        kept.append(text[position:start])
        end = text.find("</think>", start)
        if end < 0:  # reasoning that never closed: generation stopped inside it
            notes.append(
                "the answer ends inside an unfinished <think> block; that text was ignored"
            )
            position = len(text)
            break
        kept.append("\n")
        position = end + len("</think>")
    text = "".join(kept) + text[position:]
    if "</think>" in text:  # the prompt opened <think>: everything before the close is reasoning
        text = text[text.rindex("</think>") + len("</think>") :]
    return text, notes


def _snippet(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _shown(value: Any, limit: int = 80) -> str:
    try:
        return _snippet(json.dumps(value, ensure_ascii=False, default=str), limit)
    except (ValueError, TypeError, RecursionError):
        return "(unprintable)"


def _bracket_spans(text: str) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, str]]]:
    """Balanced {...} / [...] spans outside JSON strings, and `{` openers that never closed.

    A closer ends the nearest opener of its kind; openers above that one are broken. Returns the
    closed spans (start, end, depth) and the broken or cut-off objects (start, end, how).
    """
    spans: list[tuple[int, int, int]] = []
    broken: list[tuple[int, int, str]] = []
    stack: list[int] = []  # opener positions
    of_kind: dict[str, list[int]] = {"{": [], "[": []}  # indices into `stack`, by kind
    in_string = escaped = False
    for i, ch in enumerate(text):
        if in_string:
            # A raw newline cannot be inside a JSON string: end it, so one stray quote costs one line.
            in_string = not (ch == '"' and not escaped or ch == "\n")
            escaped = ch == "\\" and not escaped
        elif ch == '"' and stack:
            in_string, escaped = True, False
        elif ch in "{[":
            of_kind[ch].append(len(stack))
            stack.append(i)
        elif ch in "}]" and of_kind["{" if ch == "}" else "["]:
            level = of_kind["{" if ch == "}" else "["][-1]
            for opener in stack[level + 1 :]:
                if text[opener] == "{":
                    broken.append((opener, i, "unbalanced JSON"))
            for kind in of_kind.values():
                while kind and kind[-1] >= level:
                    kind.pop()
            spans.append((stack[level], i + 1, level))
            del stack[level:]
    broken += [(i, len(text), "JSON cut off at the end") for i in stack if text[i] == "{"]
    return spans, broken


def _decode(fragment: str) -> Any:
    """A JSON value (lenient about trailing commas and Python-style quotes), or None."""
    for candidate in (fragment, _TRAILING_COMMA.sub(r"\1", fragment)):
        try:
            return json.loads(candidate)
        except (ValueError, RecursionError):
            pass
    if "'" in fragment and len(fragment) <= _MAX_LITERAL:
        try:
            return ast.literal_eval(_TRAILING_COMMA.sub(r"\1", fragment))
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            pass
    return None


def _numbers(value: Any, count: int) -> tuple[float, ...] | None:
    """`count` finite numbers from a list (numbers or numeric strings), a string, or [[x, y], ...]."""
    if isinstance(value, str):
        value = _NUMBER.findall(value)
    if isinstance(value, list | tuple) and all(isinstance(v, list | tuple) for v in value):
        value = [v for pair in value for v in pair]  # [[x1, y1], [x2, y2]]
    if not isinstance(value, list | tuple) or len(value) != count:
        return None
    numbers = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | float | str):
            return None
        try:
            number = float(v.strip() if isinstance(v, str) else v)
        except (ValueError, OverflowError):
            return None
        if not math.isfinite(number):
            return None
        numbers.append(number)
    return tuple(numbers)


def _label(obj: dict) -> str:
    # text_content: Xiaomi's OCR grounding answers; text: an OCR box's words in other prompts.
    for key in ("label", "text_content", "text"):
        value = obj.get(key)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return " ".join(str(value).split())
    return ""


def _json_value(value: Any) -> Any:
    # Arguments may come from ast.literal_eval (sets, bytes, ...): keep them JSON-safe.
    try:
        return json.loads(json.dumps(value, default=str, allow_nan=False))
    except (ValueError, TypeError, RecursionError):
        return str(value)


def _box(x1: float, y1: float, x2: float, y2: float, label: str) -> Box:
    return Box(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2), label)


class _Reader:
    """Collects items with their position in the text, so the result keeps the answer's order."""

    def __init__(self, text: str):
        self.text = text
        self.found: list[tuple[int, Box | Point | Action]] = []
        self.notes: list[tuple[int, str]] = []

    def result(self, notes: list[str]) -> ParseResult:
        items = [item for _, item in sorted(self.found, key=lambda pair: pair[0])]
        return ParseResult(
            boxes=tuple(i for i in items if isinstance(i, Box)),
            points=tuple(i for i in items if isinstance(i, Point)),
            actions=tuple(i for i in items if isinstance(i, Action)),
            skipped=tuple(notes + [note for _, note in sorted(self.notes, key=lambda n: n[0])]),
        )

    def read_json(self) -> None:
        """Decode the outermost spans that are JSON; look inside those that are not."""
        spans, broken = _bracket_spans(self.text)
        spans.sort()
        useful: list[int] = []  # starts of spans that held grounding items
        failed: list[tuple[int, int, str]] = []
        covered = 0
        for start, end, depth in spans:
            if start < covered or depth > _MAX_DEPTH:
                continue  # inside a span that decoded, or too deep to be an answer
            value = _decode(self.text[start:end])
            if value is None:
                if self.text[start] == "{":
                    failed.append((start, end, "not valid JSON"))
                continue
            covered = end
            if self._read_value(value, start):
                useful.append(start)
        # Report the innermost objects that were lost, not every enclosing bracket.
        lost = sorted(failed + broken)
        marks = sorted(useful + [start for start, _, _ in lost])
        for start, end, how in lost:
            inner = bisect.bisect_right(marks, start)
            fragment = self.text[start:end]
            looks_like_json = any(ch in fragment for ch in "\"':")  # not a stray brace in prose
            if looks_like_json and (inner == len(marks) or marks[inner] >= end):
                self.notes.append((start, f"{how}: {_snippet(fragment)}"))

    def _read_value(self, value: Any, position: int) -> bool:
        found, saw_object, pending = False, False, [value]
        while pending:
            item = pending.pop()
            if isinstance(item, list | tuple):
                pending.extend(reversed(item))
            elif isinstance(item, dict):
                saw_object = True
                if self._read_object(item, position):
                    found = True
                else:
                    pending.extend(
                        reversed([v for v in item.values() if isinstance(v, dict | list)])
                    )
        if saw_object and not found:
            self.notes.append(
                (position, f"no bbox_2d, bbox, point_2d or action in {_shown(value)}")
            )
        return found

    def _read_object(self, obj: dict, position: int) -> bool:
        while isinstance(obj.get("action"), dict):  # {"action": {"action_name": ...}}
            obj = obj["action"]
        if not any(key in obj for key in _GROUNDING_KEYS):
            return False
        label = _label(obj)
        key = next((key for key in _BOX_KEYS if key in obj), None)  # bbox_2d first if both
        if key is not None:
            coords = _numbers(obj[key], 4)
            self._add(position, coords and _box(*coords, label), key, obj)
        if "point_2d" in obj:
            coords = _numbers(obj["point_2d"], 2)
            self._add(position, coords and Point(*coords, label), "point_2d", obj)
        if any(key in obj for key in _ACTION_KEYS):
            self._read_action(obj, position, label)
        return True

    def _read_action(self, obj: dict, position: int, label: str) -> None:
        name = obj.get("action", obj.get("action_name"))
        name = " ".join(name.split()) if isinstance(name, str) else label
        ends = []
        for key in ("start_point", "end_point"):
            coords = _numbers(obj[key], 2) if key in obj else None
            if key in obj and coords is None:
                self._add(position, None, key, obj)
            ends.append(coords and Point(*coords, name))
        arguments = tuple(
            (str(k), _json_value(v)) for k, v in obj.items() if k not in _GROUNDING_KEYS
        )
        self.found.append((position, Action(name, ends[0], ends[1], arguments)))

    def _add(self, position: int, item: Box | Point | None, key: str, obj: dict) -> None:
        if item is not None:
            self.found.append((position, item))
            return
        want = "4 numbers" if key in _BOX_KEYS else "2 numbers"
        self.notes.append((position, f"{key} should be {want}, got {_shown(obj.get(key), 40)}"))

    def read_tagged(self) -> None:
        """Qwen's <|box_start|>(x1,y1),(x2,y2)<|box_end|>, after an optional object_ref label."""
        label, label_end = "", -1
        for match in _TAGGED.finditer(self.text):
            kind, body = match.group(1), match.group(2)
            if kind == "object_ref":
                label, label_end = " ".join(body.split()), match.end()
                continue
            gap = self.text[label_end : match.start()] if label_end >= 0 else "x"
            name = label if not gap.strip(" \t\r\n,;:") else ""
            coords = _numbers(body, 2) or _numbers(body, 4)
            if coords is None:
                self.notes.append((match.start(), f"unreadable {kind}: {_snippet(match.group())}"))
            elif len(coords) == 2:
                self.found.append((match.start(), Point(*coords, name)))
            else:
                self.found.append((match.start(), _box(*coords, name)))
            if name:
                label_end = match.end()  # several boxes may follow one label
        opened = self.text.count("<|box_start|>") + self.text.count("<|point_start|>")
        closed = sum(1 for m in _TAGGED.finditer(self.text) if m.group(1) != "object_ref")
        if opened > closed:
            self.notes.append((len(self.text), f"{opened - closed} unfinished <|box_start|> text"))
