"""Grounding answers placed on the user's image: the geometry of the resize, mapping, prompt, report.

MiMo-VL answers in pixels of the image as the processor resized it. The processor records each
image's upright size and resized size (`ModelInputs.image_sizes`); `ground` maps an answer back
onto the user's picture with that record, as Xiaomi's grounding example does
(``x * width / resized_width``), and `to_json` reports it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import MimoError
from ..inputs.images import (
    DEFAULT_CONFIG,
    DEFAULT_MAX_PIXELS,
    ImageProcessorConfig,
    check_image_size,
    load_image,
    pixel_range,
    smart_resize,
)
from .parse import Action, Box, ImageGeometry, ParseResult, Point, parse_grounding


def ground(answer: str, inputs: Any) -> ParseResult:
    """Boxes, points and GUI actions of `answer`, in pixels of the one image of `inputs`.

    `inputs` is the `ModelInputs` the answer was generated from: its record of the image's resize
    is inverted exactly. A prompt with several images or any video is refused (an answer does not
    say which image a box is on).
    """
    sizes = getattr(inputs, "image_sizes", ())
    videos = getattr(inputs, "video_grid_thw", None)
    if len(sizes) != 1 or videos is not None:
        media = f"{len(sizes)} images" + (
            f" and {len(videos)} video(s)" if videos is not None else ""
        )
        raise MimoError(
            f"grounding needs exactly one image in the prompt (this one has {media}): the "
            "answer's coordinates do not say which image they are on"
        )
    original, resized = sizes[0]
    return to_original(parse_grounding(answer), ImageGeometry(original, resized))


# ---------------------------------------------------------------- geometry


def geometry_of(
    image: str | Path | Image.Image,
    min_pixels: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    config: ImageProcessorConfig = DEFAULT_CONFIG,
) -> ImageGeometry:
    """The sizes ``preprocess_images`` gives this image with the same pixel limits and config.

    A path is opened as ``load_image`` does (EXIF orientation applied); a PIL image is taken as it
    is, as ``preprocess_images`` takes it. None limits mean the config's (checkpoint's) values.
    """
    lo, hi = pixel_range(config, min_pixels, max_pixels)
    if isinstance(image, str | Path):
        image = load_image(image)
    elif not isinstance(image, Image.Image):
        raise MimoError(f"expected a PIL image or an image path, got {type(image).__name__}")
    check_image_size(image.width, image.height, config.factor)
    height, width = smart_resize(image.height, image.width, config.factor, lo, hi)
    return ImageGeometry((image.width, image.height), (width, height))


def to_original(result: ParseResult, geometry: ImageGeometry) -> ParseResult:
    """The model's coordinates (resized-image pixels) mapped onto the original image, clipped to it."""
    if result.geometry is not None:
        raise ValueError("these coordinates are already in original-image pixels")
    return replace(_mapped(result, geometry.to_original), geometry=geometry)


def to_resized(result: ParseResult) -> ParseResult:
    """The inverse of ``to_original``: original-image pixels back to the model's."""
    if result.geometry is None:
        raise ValueError("these coordinates are already in resized-image pixels")
    return replace(_mapped(result, result.geometry.to_resized), geometry=None)


def _mapped(
    result: ParseResult, move: Callable[[float, float], tuple[float, float]]
) -> ParseResult:
    def point(p: Point | None) -> Point | None:
        return None if p is None else Point(*move(p.x, p.y), p.label)

    def box(b: Box) -> Box:
        (x1, y1), (x2, y2) = move(b.x1, b.y1), move(b.x2, b.y2)
        return Box(x1, y1, x2, y2, b.label)

    return replace(
        result,
        boxes=tuple(box(b) for b in result.boxes),
        points=tuple(point(p) for p in result.points),
        actions=tuple(replace(a, start=point(a.start), end=point(a.end)) for a in result.actions),
    )


# ---------------------------------------------------------------- prompt

_REGION_PROMPT = (
    'Based on the description: "{query}", locate all regions matching the description. '
    'Output a JSON in the format [{{"bbox_2d": [...], "label": "{{the_whole_description}}"}}, ...].'
)
_GUI_PROMPT = (
    'Locate UI components that match the command: "{query}". '
    'Output a JSON in the format [{{"bbox_2d": [...], "label": "{{the_whole_command}}"}}, ...].'
)


def grounding_prompt(query: str, gui: bool = False) -> str:
    """A grounding request in the wording Xiaomi evaluates MiMo-VL with.

    From XiaomiMiMo/lmms-eval: ``PROMPT_MIMO`` of tasks/refcoco/utils_rec.py (regions matching a
    description) and, with ``gui=True``, of tasks/screenspot_v2 and osworld_g (UI components
    matching a command). Both ask for ``[{"bbox_2d": [...], "label": ...}]`` JSON.
    """
    query = " ".join(str(query).split())
    if not query:
        raise MimoError("a grounding prompt needs something to look for, e.g. 'the red car'")
    return (_GUI_PROMPT if gui else _REGION_PROMPT).format(query=query)


# ---------------------------------------------------------------- report


def to_json(result: ParseResult, indent: int | None = 2) -> str:
    """A JSON report: boxes, points and actions with labels, and what was skipped.

    Mapped results (``to_original``) report whole original-image pixels and both image sizes;
    unmapped ones report the model's own numbers.
    """
    geometry = result.geometry

    def xy(*values: float) -> list[float]:
        return [_rounded(v, whole=geometry is not None) for v in values]

    def action(a: Action) -> dict[str, Any]:
        entry: dict[str, Any] = {"action": a.name}
        if a.start is not None:
            entry["start_point"] = xy(a.start.x, a.start.y)
        if a.end is not None:
            entry["end_point"] = xy(a.end.x, a.end.y)
        return {**entry, **{k: v for k, v in a.arguments if k not in entry}}

    report = {
        "coordinates": "original image pixels" if geometry else "resized image pixels",
        "image": None,
        "boxes": [{"label": b.label, "bbox": xy(b.x1, b.y1, b.x2, b.y2)} for b in result.boxes],
        "points": [{"label": p.label, "point": xy(p.x, p.y)} for p in result.points],
        "actions": [action(a) for a in result.actions],
        "skipped": list(result.skipped),
    }
    if geometry is not None:
        (width, height), (resized_w, resized_h) = geometry.original_size, geometry.resized_size
        report["image"] = {
            "width": width,
            "height": height,
            "resized_width": resized_w,
            "resized_height": resized_h,
        }
    return json.dumps(report, ensure_ascii=False, indent=indent)


def _rounded(value: float, whole: bool) -> float | int:
    # Whole pixels on the user's image: the model's own precision is one resized pixel.
    if whole:
        return math.floor(value + 0.5)
    return int(value) if float(value).is_integer() else round(value, 2)
