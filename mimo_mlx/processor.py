"""From a user's request (prompt, images, video) to model inputs: chat template, token ids, pixels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .chat import build_prompt, expand_vision_tokens, load_chat_template
from .errors import MimoError
from .options import PromptOptions
from .processing import ImageProcessorConfig, load_image, load_processor_config, preprocess_images
from .tokenizer import Tokenizer
from .video import load_video, preprocess_video

ImageInput = str | Path | Image.Image


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
    # Per image: ((width, height) as the user sees it, (width, height) the processor resized it to).
    image_sizes: tuple[tuple[tuple[int, int], tuple[int, int]], ...] = ()

    def vision_kwargs(self) -> dict[str, Any]:
        return {
            "pixel_values": self.pixel_values,
            "image_grid_thw": self.image_grid_thw,
            "pixel_values_videos": self.pixel_values_videos,
            "video_grid_thw": self.video_grid_thw,
            "second_per_grid_ts": self.second_per_grid_ts,
        }


class Processor:
    """The text and vision front end of a model folder: tokenizer, chat template, image settings."""

    def __init__(
        self, tokenizer: Tokenizer, chat_template: str, image_config: ImageProcessorConfig
    ):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.image_config = image_config

    @classmethod
    def from_folder(cls, folder: str | Path) -> Processor:
        return cls(
            Tokenizer.from_folder(folder),
            load_chat_template(folder),
            load_processor_config(folder),
        )

    def prepare(
        self,
        prompt: str,
        images: Sequence[ImageInput] | ImageInput = (),
        videos: Sequence[str | Path] | str | Path = (),
        **options,
    ) -> ModelInputs:
        """Render the chat (images, then videos, then the text) and preprocess the media.

        `images` and `videos` are a list, or one item (a path, or a PIL image). `options` are
        `options.PromptOptions`: `min_pixels`/`max_pixels` bound each image's resized area (None:
        the checkpoint's limits); video frames are sampled at `fps`, at most `max_frames` per
        video, each frame's area bounded by `video_min_pixels`/`video_max_pixels`.
        """
        opts = PromptOptions(**options)
        images, videos = _as_list(images, "images"), _as_list(videos, "videos")
        config = self.image_config
        vision: dict[str, Any] = {}
        sizes = ()
        if images:
            # Opened here (upright, as preprocessing sees them) so their sizes can be recorded.
            images = [load_image(x) if isinstance(x, str | Path) else x for x in images]
            pixels, grid = preprocess_images(
                images, config, min_pixels=opts.min_pixels, max_pixels=opts.max_pixels
            )
            vision.update(pixel_values=pixels, image_grid_thw=grid)
            patch = config.patch_size
            sizes = tuple(
                (image.size, (int(w) * patch, int(h) * patch))
                for image, (_, h, w) in zip(images, grid, strict=True)
            )
        if videos:
            vision.update(self._videos(videos, opts))
        text = build_prompt(
            self.tokenizer,
            self.chat_template,
            prompt,
            num_images=len(images),
            num_videos=len(videos),
            system=opts.system,
            no_think=opts.no_think,
        )
        expanded = expand_vision_tokens(
            text,
            vision.get("image_grid_thw", ()),
            vision.get("video_grid_thw", ()),
            merge_size=config.merge_size,
        )
        ids = np.array([self.tokenizer.encode(expanded)], dtype=np.int64)
        vision_tokens = sum(
            int(np.prod(g, axis=1).sum()) // config.merge_size**2
            for g in (vision.get("image_grid_thw"), vision.get("video_grid_thw"))
            if g is not None
        )
        opens = text.rstrip().endswith("<think>")
        return ModelInputs(
            ids,
            text=text,
            vision_tokens=vision_tokens,
            opens_thinking=opens,
            image_sizes=sizes,
            **vision,
        )

    def _videos(self, videos: list, opts: PromptOptions) -> dict[str, Any]:
        """Every video sampled and preprocessed, concatenated in order as transformers does."""
        limits = dict(min_pixels=opts.video_min_pixels, max_pixels=opts.video_max_pixels)
        pixels, grids, seconds = [], [], []
        for video in videos:
            frames, sample_fps = load_video(
                video, opts.fps, opts.max_frames, self.image_config, **limits
            )
            px, grid, second = preprocess_video(frames, sample_fps, self.image_config, **limits)
            pixels.append(px)
            grids.append(grid)
            seconds.append(second)
        return dict(
            pixel_values_videos=np.concatenate(pixels),
            video_grid_thw=np.concatenate(grids),
            second_per_grid_ts=seconds,
        )


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
