"""Image preprocessing for MiMo-VL, pixel for pixel the same as transformers' Qwen2VLImageProcessor.

The reference is transformers 5's PIL backend, ``Qwen2VLImageProcessorPil`` (what
``AutoImageProcessor`` builds for ``qwen2_5_vl`` without torchvision; qwen-vl-utils also resizes
images with PIL bicubic). Steps: RGB with alpha composited onto white, ``smart_resize`` to
multiples of 28, PIL bicubic, ``x * (1/255)`` in float64 cast to float32, ``(x - mean) / std`` in
float32, then 1176-long patch vectors. Same operations in the same order, so bit-identical output.
The torchvision backend resizes with torch's antialiased bicubic instead: up to 1/255 apart on
natural images. Video frames go through the same steps (see ``video.py``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import MimoError
from ..options import DEFAULT_MAX_PIXELS
from .image_files import (  # noqa: F401  (load_image, to_rgb, ... are this module's API too)
    MAX_ASPECT_RATIO,
    MAX_IMAGE_PIXELS,
    EncodedImage,
    check_image_size,
    load_image,
    to_rgb,
)

DEFAULT_MIN_PIXELS = 3136
"""The checkpoint's min_pixels (56 x 56 = 4 patches of 28 x 28)."""

CHECKPOINT_MAX_PIXELS = 12_845_056
"""The published preprocessor_config.json's max_pixels: 16,384 merged tokens for one image."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageProcessorConfig:
    """preprocessor_config.json's rules for turning pixels into patches (defaults: MiMo-VL-7B)."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = CHECKPOINT_MAX_PIXELS
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)

    def __post_init__(self) -> None:
        for name in ("patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise MimoError(
                    f"preprocessor config: {name} must be a positive integer, got {value!r}"
                )
        if self.min_pixels > self.max_pixels:
            raise MimoError(
                f"preprocessor config: min_pixels ({self.min_pixels}) exceeds "
                f"max_pixels ({self.max_pixels})"
            )
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != 3:
                raise MimoError(f"preprocessor config: {name} needs 3 values (R, G, B)")
        if min(self.image_std) <= 0:
            raise MimoError("preprocessor config: image_std values must be positive")

    @property
    def factor(self) -> int:
        """Side of one merged token in pixels (28): resized sides are multiples of it."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: 3 channels x temporal patch x patch x patch (1176)."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ImageProcessorConfig:
        """Read a preprocessor_config.json dict; explicit min/max_pixels win over ``size``.

        transformers 4.x writes ``min_pixels``/``max_pixels`` at the root (and sometimes inside
        ``size``); transformers 5 writes ``size = {shortest_edge, longest_edge}``, both in pixels.
        """
        size = raw.get("size") or {}
        if not isinstance(size, dict):
            raise MimoError(f"preprocessor config: size must be a mapping, got {size!r}")
        kwargs: dict[str, Any] = {}
        min_pixels = raw.get("min_pixels", size.get("min_pixels", size.get("shortest_edge")))
        max_pixels = raw.get("max_pixels", size.get("max_pixels", size.get("longest_edge")))
        if min_pixels is not None:
            kwargs["min_pixels"] = min_pixels
        if max_pixels is not None:
            kwargs["max_pixels"] = max_pixels
        for name in (
            "patch_size",
            "merge_size",
            "temporal_patch_size",
            "rescale_factor",
            "resample",
        ):
            if raw.get(name) is not None:
                kwargs[name] = raw[name]
        for name in ("image_mean", "image_std"):
            if raw.get(name) is not None:
                try:
                    kwargs[name] = tuple(float(v) for v in raw[name])
                except (TypeError, ValueError) as err:
                    raise MimoError(f"preprocessor config: {name} must be 3 numbers") from err
        return cls(**kwargs)


DEFAULT_CONFIG = ImageProcessorConfig()


def load_processor_config(model_dir: str | Path) -> ImageProcessorConfig:
    """The model folder's preprocessor_config.json as a config, or MiMo-VL's defaults if absent."""
    path = Path(model_dir) / "preprocessor_config.json"
    if not path.is_file():
        return DEFAULT_CONFIG
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MimoError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise MimoError(f"{path} must hold a JSON object")
    return ImageProcessorConfig.from_dict(raw)


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, area in [min_pixels, max_pixels].

    The same arithmetic as transformers' ``smart_resize`` (Python's banker's ``round`` included),
    so the patch grid and token count always agree with the reference.
    """
    if min(height, width) <= 0:
        raise MimoError(f"cannot resize an empty image ({width}x{height})")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise MimoError(
            f"aspect ratio of {width}x{height} is above {MAX_ASPECT_RATIO}:1; crop the image first"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def pixel_range(
    config: ImageProcessorConfig,
    min_pixels: int | None,
    max_pixels: int | None,
    names: tuple[str, str] = ("min_pixels", "max_pixels"),
) -> tuple[int, int]:
    """Resolve per-call pixel limits; None means the config's (checkpoint's) value. `names` are
    the options the limits came from, for the message when they cannot both hold."""
    lo = config.min_pixels if min_pixels is None else min_pixels
    hi = config.max_pixels if max_pixels is None else max_pixels
    low, high = names
    if lo <= 0:
        raise MimoError(f"{low} must be a positive integer, got {lo}")
    if hi < lo:
        hi_from = "" if max_pixels is not None else ", the model's"
        lo_from = "" if min_pixels is not None else ", the model's"
        raise MimoError(
            f"{high} ({hi}{hi_from}) is below {low} ({lo}{lo_from}): no size fits both; give a "
            f"larger {high} or a smaller {low}"
        )
    return lo, hi


def resize_rgb(image: Image.Image, height: int, width: int, resample: int) -> np.ndarray:
    """Resize an RGB image to (height, width) with PIL, as transformers does: (H, W, 3) uint8."""
    # PIL returns an exact copy when the size already matches, so resizing twice is harmless.
    return np.asarray(image.resize((width, height), resample=resample))


def normalize(frames: np.ndarray, config: ImageProcessorConfig) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) float32, rescaled and normalized like transformers."""
    # transformers rescales in float64 then casts, and normalizes in float32: same bits here.
    scaled = (frames.astype(np.float64) * config.rescale_factor).astype(np.float32)
    mean = np.asarray(config.image_mean, dtype=np.float32)
    std = np.asarray(config.image_std, dtype=np.float32)
    return ((scaled - mean) / std).transpose(0, 3, 1, 2)


def patchify(frames: np.ndarray, config: ImageProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
    """(T, C, H, W) float32 frames -> (grid_t * grid_h * grid_w, patch_dim) patches and (3,) grid.

    T is padded to a multiple of temporal_patch_size by repeating the last frame (an image becomes
    2 equal frames). Rows come in merge-block order: the 2x2 patches of a merged token are adjacent.
    """
    tp, ps, ms = config.temporal_patch_size, config.patch_size, config.merge_size
    if pad := -frames.shape[0] % tp:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
    t, c, h, w = frames.shape
    gt, gh, gw = t // tp, h // ps, w // ps
    patches = frames.reshape(gt, tp, c, gh // ms, ms, ps, gw // ms, ms, ps)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, gh/m, gw/m, m, m, C, tp, ps, ps)
    return patches.reshape(gt * gh * gw, c * tp * ps * ps), np.array([gt, gh, gw], dtype=np.int64)


def preprocess_images(
    images: Sequence[Image.Image | str | Path] | Image.Image,
    config: ImageProcessorConfig = DEFAULT_CONFIG,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, np.ndarray]:
    """Images (PIL or paths) -> (pixel_values (N, 1176) float32, image_grid_thw (images, 3) int64).

    ``min_pixels``/``max_pixels`` bound each image's resized area; None takes the config's value
    (the checkpoint allows 12.8 MP, hence the laptop default ``DEFAULT_MAX_PIXELS``).
    Images are concatenated along axis 0 in order.
    """
    if isinstance(images, Image.Image | str | Path):
        images = [images]
    if not images:
        raise MimoError("preprocess_images needs at least one image")
    lo, hi = pixel_range(config, min_pixels, max_pixels)
    all_patches, grids = [], []
    for item in images:
        if isinstance(item, str | Path):
            image = load_image(item)
        elif isinstance(item, Image.Image):
            image = to_rgb(item)
        else:
            raise MimoError(f"expected a PIL image or an image path, got {type(item).__name__}")
        check_image_size(image.width, image.height, config.factor)
        height, width = smart_resize(image.height, image.width, config.factor, lo, hi)
        pixels = resize_rgb(image, height, width, config.resample)
        patches, grid = patchify(normalize(pixels[None], config), config)
        all_patches.append(patches)
        grids.append(grid)
    return np.concatenate(all_patches, axis=0), np.stack(grids)


def preprocess_encoded(
    image: EncodedImage,
    config: ImageProcessorConfig = DEFAULT_CONFIG,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """An image held undecoded (the server's) -> (pixel_values, grid (3,), upright (width, height)).

    The grid is the full image's, as `preprocess_images` computes it. The pixels are the same
    bit for bit unless the image is over `REDUCING_GAP` (3) times the resized size on both sides;
    such an image is shrunk while it decodes (`EncodedImage.decode`), which moves resized pixels
    by less than 1/255 on average (measured; tests/test_image_files.py holds the bound).
    """
    lo, hi = pixel_range(config, min_pixels, max_pixels)

    def target(height: int, width: int) -> tuple[int, int]:
        check_image_size(width, height, config.factor, name=image.name)
        return smart_resize(height, width, config.factor, lo, hi)

    decoded, (width, height) = image.decode(target)
    resized_height, resized_width = target(height, width)
    pixels = resize_rgb(decoded, resized_height, resized_width, config.resample)
    patches, grid = patchify(normalize(pixels[None], config), config)
    return patches, grid, (width, height)
