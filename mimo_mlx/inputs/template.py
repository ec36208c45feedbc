"""Chat prompts: the folder's Jinja chat template, vision placeholder expansion, thinking split.

Rendering follows transformers' `apply_chat_template(..., add_generation_prompt=True,
tokenize=False)` (utils/chat_template_utils.py); placeholder expansion follows Qwen2_5_VLProcessor
(each `<|image_pad|>` becomes grid_t*grid_h*grid_w / merge_size**2 copies, in order).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import jinja2
from jinja2 import meta, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import MimoError
from .tokenizer import Tokenizer, read_json_config

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
NO_THINK = "/no_think"

Message = dict[str, Any]


# ---------------------------------------------------------------- template loading


def _tokenizer_config_template(folder: Path) -> str | None:
    template = read_json_config(folder / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {item.get("name"): item.get("template") for item in template}
        template = named.get("default")
    return template


def _template_candidates(folder: Path) -> Iterator[str | None]:
    # transformers 5: the processor (what Qwen2.5-VL checkpoints use) reads a `chat_template` key of
    # processor_config.json, else chat_template.json, else chat_template.jinja; the tokenizer reads
    # chat_template.jinja, else tokenizer_config.json. Lazily, in that order.
    yield read_json_config(folder / "processor_config.json").get("chat_template")
    yield read_json_config(folder / "chat_template.json").get("chat_template")
    jinja_file = folder / "chat_template.jinja"
    yield jinja_file.read_text(encoding="utf-8") if jinja_file.is_file() else None
    yield _tokenizer_config_template(folder)


def load_chat_template(folder: str | Path) -> str:
    """The chat template of a model folder, found where transformers looks for it."""
    for template in _template_candidates(Path(folder)):
        if isinstance(template, str) and template:
            return template
    raise MimoError(
        f"No chat template in {folder} (looked for chat_template.json, chat_template.jinja and "
        "tokenizer_config.json['chat_template']). Copy the chat template files from the original "
        "checkpoint."
    )


def load_tool_template(folder: str | Path) -> str | None:
    """The first of the folder's chat templates (in `load_chat_template`'s order) that renders
    `tools`; None when none does. Qwen2.5-VL-style folders keep a vision template without tools
    (chat_template.json) beside the text template with them (tokenizer_config.json)."""
    for template in _template_candidates(Path(folder)):
        if isinstance(template, str) and template and renders_tools(template):
            return template
    return None


def renders_tools(template: str) -> bool:
    """Whether a chat template reads the `tools` variable (the function definitions)."""
    try:
        return "tools" in meta.find_undeclared_variables(
            _compile(template).environment.parse(template)
        )
    except jinja2.TemplateError:
        return False


# ---------------------------------------------------------------- rendering


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks text for training masks; here it renders."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers replaces Jinja's tojson, which HTML-escapes, with plain json.dumps.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    # Templates come from downloaded folders: sandboxed, configured like transformers' environment.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat(
    template: str,
    messages: Sequence[Message],
    special_tokens: Mapping[str, str] | None = None,
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    **template_kwargs: Any,
) -> str:
    """Render `messages` with a chat template, as transformers' apply_chat_template(tokenize=False).

    `special_tokens` (bos_token, eos_token, ...) are visible to the template, like the tokenizer's
    special_tokens_map; `template_kwargs` override them. `tools` are function definitions as
    OpenAI writes them ({"type": "function", "function": {...}}), passed as transformers does.
    """
    # transformers drops None-valued keys, which templates treat as missing rather than as "None".
    messages = [{k: v for k, v in message.items() if v is not None} for message in messages]
    variables = {**dict(special_tokens or {}), **template_kwargs}
    try:
        return _compile(template).render(
            messages=messages,
            tools=list(tools) if tools else None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except Exception as err:  # a template can fail in any way Python can
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        kinds = {
            part.get("type")
            for m in messages
            if isinstance(m.get("content"), list)
            for part in m["content"]
        }
        hint = ""
        if kinds & {"image", "video"}:
            hint = (
                " It may handle text-only prompts: use the chat template of the original "
                "Qwen2.5-VL / MiMo-VL checkpoint (chat_template.json) for images and video."
            )
        raise MimoError(
            f"the chat template failed ({type(err).__name__}: {message}).{hint}"
        ) from None


def user_text(prompt: str, no_think: bool = False) -> str:
    """The user's text, with MiMo's "/no_think" switch appended at the very end when asked."""
    if not no_think or prompt.endswith(NO_THINK):
        return prompt
    separator = "" if not prompt or prompt[-1].isspace() else " "
    return f"{prompt}{separator}{NO_THINK}"


def build_messages(
    prompt: str,
    num_images: int = 0,
    num_videos: int = 0,
    system: str | None = None,
    no_think: bool = False,
) -> list[Message]:
    """One user turn with images, then videos, then the text (MiMo's recommended order).

    A text-only turn's content is a plain string, which every ChatML template renders (some, like
    the one llama.cpp ships for MiMo-VL, handle nothing else). A `system` message replaces the
    template's default system prompt; without one the template adds MiMo's own.
    """
    text = user_text(prompt, no_think)
    content: str | list[dict[str, Any]] = text
    if num_images or num_videos:
        media = [{"type": "image"}] * num_images + [{"type": "video"}] * num_videos
        content = [*media, {"type": "text", "text": text}]
    messages: list[Message] = [] if system is None else [{"role": "system", "content": system}]
    return [*messages, {"role": "user", "content": content}]


def build_prompt(
    tokenizer: Tokenizer,
    template: str,
    prompt: str,
    num_images: int = 0,
    num_videos: int = 0,
    system: str | None = None,
    no_think: bool = False,
) -> str:
    """The rendered chat (one placeholder per image / video), ending with the assistant header."""
    messages = build_messages(prompt, num_images, num_videos, system=system, no_think=no_think)
    text = render_chat(template, messages, tokenizer.special_tokens_map, add_generation_prompt=True)
    check_media_rendered(text, num_images, num_videos)
    return text


def inline_media(messages: Sequence[Message]) -> list[Message]:
    """Messages whose image and video parts are written into their text as Qwen2.5-VL's template
    writes them (`<|vision_start|><|image_pad|><|vision_end|>`), for a text-only template."""
    marks = {"image": IMAGE_TOKEN, "video": VIDEO_TOKEN}
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            pieces = [
                part["text"]
                if part["type"] == "text"
                else f"<|vision_start|>{marks[part['type']]}<|vision_end|>"
                for part in content
            ]
            message = {**message, "content": "".join(pieces)}
        out.append(message)
    return out


def check_media_rendered(text: str, num_images: int, num_videos: int) -> None:
    """A template that drops or garbles image/video parts fails here, not as a confused model."""
    for token, count, kind in (
        (IMAGE_TOKEN, num_images, "image"),
        (VIDEO_TOKEN, num_videos, "video"),
    ):
        if count and text.count(token) != count:
            raise MimoError(
                f"this model's chat template does not place {kind}s (it rendered "
                f"{text.count(token)} {token} for {count} {kind}(s)); it handles text-only "
                "prompts. Use the chat template of the original Qwen2.5-VL / MiMo-VL checkpoint "
                "(chat_template.json) for images and video."
            )


# ---------------------------------------------------------------- vision placeholders


def _token_counts(grid_thw: Sequence[Sequence[int]], merge_size: int) -> list[int]:
    # One merged token per merge_size x merge_size block of patches, as Qwen2_5_VLProcessor counts.
    return [int(t) * int(h) * int(w) // merge_size**2 for t, h, w in grid_thw]


def _check_count(text: str, token: str, grids: Sequence[Sequence[int]], kind: str) -> None:
    found = text.count(token)
    if found != len(grids):
        raise MimoError(
            f"The prompt has {found} {token} placeholder(s) but {len(grids)} {kind}(s) were given; "
            f"give one {kind} per placeholder and do not type {token} in the prompt yourself."
        )


def expand_vision_tokens(
    text: str,
    image_grid_thw: Sequence[Sequence[int]] = (),
    video_grid_thw: Sequence[Sequence[int]] = (),
    merge_size: int = 2,
    image_token: str = IMAGE_TOKEN,
    video_token: str = VIDEO_TOKEN,
) -> str:
    """Repeat the i-th image (video) placeholder t*h*w/merge**2 times for the i-th grid."""
    _check_count(text, image_token, image_grid_thw, "image")
    _check_count(text, video_token, video_grid_thw, "video")
    counts = {
        image_token: iter(_token_counts(image_grid_thw, merge_size)),
        video_token: iter(_token_counts(video_grid_thw, merge_size)),
    }
    pattern = "|".join(re.escape(token) for token in (image_token, video_token))
    return re.sub(pattern, lambda m: m.group() * next(counts[m.group()]), text)


# ---------------------------------------------------------------- thinking split

Kind = Literal["thinking", "answer"]


def _held_prefix_len(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could be the start of `tag` (to hold back)."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ThinkingSplitter:
    """Splits streamed text into ("thinking", text) and ("answer", text) segments.

    MiMo writes `<think>...</think>` then the answer, and sometimes more think blocks later: every
    block goes to the thinking, in order, and the answer never holds a think tag (a stray
    `</think>` is dropped). The first opening tag is optional: some templates already open it in
    the generation prompt (`prompt_opened_thinking=True`: text before `</think>` is thinking);
    otherwise output that starts without one is answer. Leading whitespace before a first
    `<think>` is dropped. Tags may arrive split across pieces; they are never emitted.
    """

    def __init__(
        self,
        prompt_opened_thinking: bool = False,
        open_tag: str = "<think>",
        close_tag: str = "</think>",
    ) -> None:
        self._open, self._close = open_tag, close_tag
        self._untagged: Kind = "thinking" if prompt_opened_thinking else "answer"
        self._state: Literal["start", "thinking", "answer"] = "start"
        self._buffer = ""

    def feed(self, piece: str) -> list[tuple[Kind, str]]:
        """Add a piece of generated text; return the segments that are now certain."""
        self._buffer += piece
        segments: list[tuple[Kind, str]] = []
        while self._step(segments):
            pass
        return segments

    def finalize(self) -> list[tuple[Kind, str]]:
        """Flush held-back text (an unfinished tag is plain text after all)."""
        kind: Kind = self._untagged if self._state == "start" else self._state
        text, self._buffer = self._buffer, ""
        return [(kind, text)] if text else []

    def _step(self, segments: list[tuple[Kind, str]]) -> bool:
        # One state transition; True when another step may make progress.
        if self._state == "start":
            return self._step_start()
        if self._state == "thinking":
            return self._emit_until(segments, "thinking", {self._close: "answer"})
        return self._emit_until(segments, "answer", {self._open: "thinking", self._close: "answer"})

    def _step_start(self) -> bool:
        stripped = self._buffer.lstrip()
        if stripped.startswith(self._open):
            self._buffer, self._state = stripped[len(self._open) :], "thinking"
            return True
        if self._open.startswith(stripped):
            return False  # still could be the opening tag: wait for more text
        self._state = self._untagged
        return True

    def _emit_until(self, segments: list[tuple[Kind, str]], kind: Kind, tags: dict) -> bool:
        """Emit text up to the first of `tags` (switching to the state it names), holding back
        an ending that could still become a tag."""
        found = [(self._buffer.find(tag), tag) for tag in tags if tag in self._buffer]
        if found:
            at, tag = min(found)
            if at:
                segments.append((kind, self._buffer[:at]))
            self._buffer, self._state = self._buffer[at + len(tag) :], tags[tag]
            return True
        keep = max(_held_prefix_len(self._buffer, tag) for tag in tags)
        ready = self._buffer[: len(self._buffer) - keep]
        if ready:
            segments.append((kind, ready))
        self._buffer = self._buffer[len(ready) :]
        return False


def split_thinking(text: str, prompt_opened_thinking: bool = False) -> tuple[str, str]:
    """(reasoning, answer) of a whole generated text: think blocks joined by a blank line."""
    splitter = ThinkingSplitter(prompt_opened_thinking=prompt_opened_thinking)
    blocks: list[list[str]] = []
    answer: list[str] = []
    previous = None
    for kind, piece in splitter.feed(text) + splitter.finalize():
        if kind == "thinking":
            if previous != "thinking":
                blocks.append([])
            blocks[-1].append(piece)
        else:
            answer.append(piece)
        previous = kind
    thinking = "\n\n".join(b for b in ("".join(parts).strip() for parts in blocks) if b)
    return thinking, "".join(answer).strip()
