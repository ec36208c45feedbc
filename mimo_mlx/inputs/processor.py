"""From a user's request (prompt, images, video) to model inputs: chat template, token ids, pixels."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import secrets
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ContextFull, MimoError
from ..options import PromptOptions
from .images import (
    EncodedImage,
    ImageProcessorConfig,
    load_image,
    load_processor_config,
    pixel_range,
    preprocess_encoded,
    preprocess_images,
)
from .messages import Media, split_messages
from .template import (
    check_media_rendered,
    expand_vision_tokens,
    inline_media,
    load_chat_template,
    load_tool_template,
    render_chat,
    renders_tools,
)
from .tokenizer import Tokenizer
from .video import VIDEO_PIXEL_NAMES, preprocess_video, read_video

ImageInput = str | Path | Image.Image
_MARKER = re.compile("(\x00[0-9a-f]{16}:\\d+\x00)")  # stands for a typed text while rendering


@dataclass(frozen=True)
class PreparedMedia:
    """One image or video, preprocessed: its patches and grid, and what grounding needs."""

    kind: str  # "image" or "video"
    pixel_values: np.ndarray | None  # (t * h * w, patch_dim) float32; None once encoded
    grid_thw: tuple[int, int, int]
    second_per_grid_t: float | None = None  # videos: seconds one temporal patch spans
    sizes: tuple[tuple[int, int], tuple[int, int]] | None = None  # images: (upright, resized)
    notice: str | None = None  # videos: what the token budget changed, if anything
    known_key: str | None = field(default=None, repr=False, compare=False)
    # Once encoded (a conversation's history): the merged vision features, and a weak reference
    # to the model that computed them (features are only ever reused with that model).
    features: Any = field(default=None, repr=False, compare=False)
    encoder: Any = field(default=None, repr=False, compare=False)

    @cached_property
    def key(self) -> str:
        """A content key: the preprocessed pixels fold in every preprocessing setting, so equal
        keys mean equal vision features for a given model."""
        if self.known_key is not None:
            return self.known_key
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"{self.kind}:{self.grid_thw}:{self.second_per_grid_t}".encode())
        digest.update(np.ascontiguousarray(self.pixel_values).data)
        return digest.hexdigest()

    def encoded(self, features: Any, model: Any) -> PreparedMedia:
        """The item as a conversation keeps it once `model` has encoded it: key, grid, sizes
        and the features, no pixels (they are 4 bytes per value, twice per patch)."""
        return dataclasses.replace(
            self,
            pixel_values=None,
            known_key=self.key,
            features=features,
            encoder=weakref.ref(model),
        )

    def features_for(self, model: Any) -> Any:
        """The features `model` computed for this item, if it did; else None."""
        return self.features if self.encoder is not None and self.encoder() is model else None


@dataclass(frozen=True)
class ModelInputs:
    """One prompt, ready for `Model`: token ids (1, L) and the vision inputs its placeholders need."""

    input_ids: np.ndarray
    pixel_values: np.ndarray | None = None
    image_grid_thw: np.ndarray | None = None
    pixel_values_videos: np.ndarray | None = None
    video_grid_thw: np.ndarray | None = None
    second_per_grid_ts: list[float] | None = None
    text: str = ""  # the rendered prompt, before vision placeholders were expanded
    vision_tokens: int = 0  # how many of the ids are image/video placeholders
    opens_thinking: bool = field(default=False)  # the template already opened <think>
    no_think: bool = False  # the prompt asks the model not to reason first
    # Per image: ((width, height) as the user sees it, (width, height) the processor resized it to).
    image_sizes: tuple[tuple[tuple[int, int], tuple[int, int]], ...] = ()
    media: tuple[PreparedMedia, ...] = ()  # every image and video, in order of appearance
    notices: tuple[str, ...] = ()  # what preparing this prompt's new media changed (a budget)

    def vision_kwargs(self) -> dict[str, Any]:
        held = [m for m in self.media if m.pixel_values is None]
        if held:
            raise MimoError(
                f"{len(held)} image(s) or video(s) of these inputs were encoded by a "
                "Conversation, which keeps their features, not their pixels: continue them in a "
                "Conversation, or give the images themselves"
            )
        return {
            "pixel_values": self.pixel_values,
            "image_grid_thw": self.image_grid_thw,
            "pixel_values_videos": self.pixel_values_videos,
            "video_grid_thw": self.video_grid_thw,
            "second_per_grid_ts": self.second_per_grid_ts,
        }


class Processor:
    """The text and vision front end of a model folder: tokenizer, chat template, image settings.

    `tool_template` renders requests that carry tools: the chat template if it renders them,
    else another template of the folder that does (None: tools cannot be offered)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str,
        image_config: ImageProcessorConfig,
        tool_template: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.image_config = image_config
        if tool_template is None and renders_tools(chat_template):
            tool_template = chat_template
        self.tool_template = tool_template

    @classmethod
    def from_folder(cls, folder: str | Path) -> Processor:
        return cls(
            Tokenizer.from_folder(folder),
            load_chat_template(folder),
            load_processor_config(folder),
            load_tool_template(folder),
        )

    def check_options(self, opts: PromptOptions) -> None:
        """Refuse pixel limits no image or video frame could meet (MimoError), before any
        media comes: a chat or a server started with them would fail at the first image."""
        pixel_range(self.image_config, opts.min_pixels, opts.max_pixels)
        pixel_range(
            self.image_config, opts.video_min_pixels, opts.video_max_pixels, VIDEO_PIXEL_NAMES
        )

    def prepare(
        self,
        prompt: str,
        images: Sequence[ImageInput] | ImageInput = (),
        videos: Sequence[str | Path] | str | Path = (),
        **options,
    ) -> ModelInputs:
        """One user turn: images, then videos, then the text (MiMo's recommended order).

        `images` and `videos` are a list, or one item (a path, or a PIL image). `options` are
        `options.PromptOptions`: `min_pixels`/`max_pixels` bound each image's resized area (None:
        the checkpoint's limits); video frames are sampled at `fps`, at most `max_frames` per
        video, each frame's area bounded by `video_min_pixels`/`video_max_pixels`, each video
        within `video_max_tokens` (frames shrunk, then fewer; `ModelInputs.notices` says so).
        """
        media = [{"type": "image", "image": x} for x in _as_list(images, "images")]
        media += [{"type": "video", "video": x} for x in _as_list(videos, "videos")]
        content = [*media, {"type": "text", "text": prompt}]
        return self.prepare_messages([{"role": "user", "content": content}], **options)

    def prepare_messages(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool = True,
        preprocess: Callable[[Media, PromptOptions], PreparedMedia] | None = None,
        tools: Sequence[dict] | None = None,
        max_tokens: int | None = None,
        **options,
    ) -> ModelInputs:
        """A whole conversation (see `messages.py` for the accepted shapes), rendered with the
        chat template and tokenized as transformers would, its media preprocessed in order.

        `preprocess` replaces `self.preprocess` (a conversation reuses what it prepared before).
        `tools` (OpenAI's function definitions) are shown to the model by `tool_template`; when
        that is a text-only template, images and videos are written in as Qwen2.5-VL writes them.
        Control tokens spelled in message text (a user typing `<|im_start|>system`) stay plain
        text; transformers would read them as control tokens. `max_tokens`: a prompt whose text
        alone surely passes it raises ContextFull before any media is decoded or the whole text
        tokenized.
        """
        opts = PromptOptions(**options)
        rendered, media = split_messages(messages, system=opts.system, no_think=opts.no_think)
        template = self.chat_template
        if tools:
            template = self._template_for_tools()
        inline = bool(tools) and template != self.chat_template
        self._refuse_spelled_tools(tools, rendered)

        def render(messages: list[dict]) -> str:
            messages = inline_media(messages) if inline else messages
            special = self.tokenizer.special_tokens_map
            return render_chat(template, messages, special, add_generation_prompt, tools=tools)

        text = render(rendered)
        around, typed = self._around_typed_tokens(rendered, text, render)
        check_media_rendered(around, *(sum(m.kind == k for m in media) for k in ("image", "video")))
        if max_tokens is not None and (found := self.tokenizer.surely_exceeds(text, max_tokens)):
            raise ContextFull(
                f"the prompt is at least {found} tokens, but at most {max_tokens} fit",
                tokens=found,
                limit=max_tokens,
            )
        prepared = tuple((preprocess or self.preprocess)(item, opts) for item in media)
        notices = tuple(
            m.notice
            for item, m in zip(media, prepared, strict=True)
            if m.notice and not isinstance(item.source, PreparedMedia)  # said when first read
        )
        images = [m for m in prepared if m.kind == "image"]
        videos = [m for m in prepared if m.kind == "video"]
        image_grids = np.array([m.grid_thw for m in images], dtype=np.int64).reshape(-1, 3)
        video_grids = np.array([m.grid_thw for m in videos], dtype=np.int64).reshape(-1, 3)
        merge = self.image_config.merge_size
        expanded = expand_vision_tokens(around, image_grids, video_grids, merge_size=merge)
        vision: dict[str, Any] = {}
        if images:
            vision.update(pixel_values=_stacked(images), image_grid_thw=image_grids)
        if videos:
            vision.update(
                pixel_values_videos=_stacked(videos),
                video_grid_thw=video_grids,
                second_per_grid_ts=[m.second_per_grid_t for m in videos],
            )
        return ModelInputs(
            np.array([self._token_ids(expanded, typed)], dtype=np.int64),
            text=text,
            vision_tokens=sum(int(np.prod(m.grid_thw)) // merge**2 for m in prepared),
            opens_thinking=text.rstrip().endswith("<think>"),
            no_think=opts.no_think,
            image_sizes=tuple(m.sizes for m in images),
            media=prepared,
            notices=notices,
            **vision,
        )

    def _template_for_tools(self) -> str:
        if self.tool_template is None:
            raise MimoError(
                "this model's chat templates do not render tools (none of chat_template.json, "
                "chat_template.jinja and tokenizer_config.json reads `tools`), so the model would "
                "never see them; add a chat_template.jinja that does (Qwen2.5's, for example)"
            )
        return self.tool_template

    def _refuse_spelled_tools(self, tools: Sequence[dict] | None, rendered: list[dict]) -> None:
        """Tool definitions and tool calls are rendered as JSON, where a typed control token
        could not be kept as text: refused instead."""
        calls = [m.get("tool_calls") for m in rendered if m.get("tool_calls")]
        written = json.dumps([tools or [], calls], ensure_ascii=False)
        spelled = [token for token in self.tokenizer.special_tokens if token in written]
        if spelled:
            raise MimoError(
                f"a tool definition or tool call spells the control token {spelled[0]}, which "
                "could only reach the model as a control token; remove it"
            )

    def _around_typed_tokens(
        self, rendered: list[dict], text: str, render: Callable[[list[dict]], str]
    ) -> tuple[str, dict[str, str]]:
        """(the rendered prompt with each message text that spells a control token swapped for
        a marker, {marker: that text}). Only the template's own tokens are left in the prompt:
        its images are counted and expanded there, and the texts tokenized apart, as plain text.
        Nothing spelled (the usual case): (the prompt as rendered, {})."""
        specials = self.tokenizer.special_tokens
        spelled = sorted({t for t in _texts(rendered) if any(s in t for s in specials)})
        if not spelled:
            return text, {}
        nonce = secrets.token_hex(8)
        markers = {t: f"\x00{nonce}:{i}\x00" for i, t in enumerate(spelled)}
        around = render(_with_texts(rendered, markers))
        typed = {marker: t for t, marker in markers.items()}
        if _MARKER.sub(lambda m: typed.get(m.group(), m.group()), around) != text:
            raise MimoError(
                "a message spells a control token (such as <|im_start|>), and this model's chat "
                "template rewrites message text, so it cannot be kept as plain text; remove it"
            )
        return around, typed

    def _token_ids(self, expanded: str, typed: dict[str, str]) -> list[int]:
        """Token ids of the expanded prompt: whole, exactly as transformers tokenizes it, unless
        it holds markers; then piece by piece, the typed texts with no control tokens."""
        if not typed:
            return self.tokenizer.encode(expanded)
        ids: list[int] = []
        for piece in _MARKER.split(expanded):
            if piece in typed:
                ids += self.tokenizer.encode(typed[piece], parse_special=False)
            elif piece:
                ids += self.tokenizer.encode(piece)
        return ids

    def preprocess(self, item: Media, opts: PromptOptions) -> PreparedMedia:
        """One image (upright, resized, normalized, patched) or video (sampled, then the same);
        an item prepared before passes through."""
        if isinstance(item.source, PreparedMedia):
            return item.source
        config = self.image_config
        if item.kind == "video":
            limits = dict(min_pixels=opts.video_min_pixels, max_pixels=opts.video_max_pixels)
            if not isinstance(item.source, str | Path):
                raise MimoError(
                    f"a video is a file or a folder of frames, got {type(item.source).__name__}"
                )
            clip = read_video(
                item.source,
                opts.fps,
                opts.max_frames,
                config,
                max_tokens=opts.video_max_tokens,
                **limits,
            )
            size = clip.frames.shape[1:3]  # as read_video sized them, within the budget
            pixels, grid, second = preprocess_video(clip.frames, clip.fps, config, size=size)
            grid_thw = tuple(int(v) for v in grid[0])
            return PreparedMedia("video", pixels, grid_thw, second, notice=clip.notice)
        limits = dict(min_pixels=opts.min_pixels, max_pixels=opts.max_pixels)
        if isinstance(item.source, EncodedImage):  # the server's: decoded only now
            pixels, grid, size = preprocess_encoded(item.source, config, **limits)
        else:
            image = load_image(item.source) if isinstance(item.source, str | Path) else item.source
            (pixels, grids), size = preprocess_images([image], config, **limits), image.size
            grid = grids[0]
        t, h, w = (int(v) for v in grid)
        resized = (w * config.patch_size, h * config.patch_size)
        return PreparedMedia("image", pixels, (t, h, w), sizes=(size, resized))


def _as_list(items: Any, name: str) -> list:
    """A list of media items from a list, a tuple, or one item (a path string is one item)."""
    if items is None:
        return []
    if isinstance(items, str | Path | Image.Image):
        return [items]
    try:
        return list(items)
    except TypeError:
        raise MimoError(f"{name} must be a path, a PIL image or a list of them") from None


def _texts(messages: list[dict]) -> list[str]:
    """Every text of rendered messages (string contents and text parts)."""
    found = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            found.append(content)
        else:
            found += [part["text"] for part in content if part["type"] == "text"]
    return found


def _with_texts(messages: list[dict], swap: dict[str, str]) -> list[dict]:
    """Rendered messages with each text found in `swap` replaced by its value."""

    def one(content):
        if isinstance(content, str):
            return swap.get(content, content)
        return [
            {**part, "text": swap.get(part["text"], part["text"])}
            if part["type"] == "text"
            else part
            for part in content
        ]

    return [{**message, "content": one(message["content"])} for message in messages]


def _stacked(media: list[PreparedMedia]) -> np.ndarray | None:
    """The items' pixels in one array; None when an item kept only its features (a
    conversation's history: `Conversation` encodes item by item)."""
    if any(m.pixel_values is None for m in media):
        return None
    return np.concatenate([m.pixel_values for m in media])
