"""Video loading and preprocessing for MiMo-VL, following qwen-vl-utils' conventions.

Frames are sampled uniformly at ``fps`` (2 by default) from a video file, or taken as-is from a
folder of images that were already sampled at ``fps``. Every frame is resized to one
``smart_resize`` size and normalized exactly like an image (``images.py``); frames are grouped
in pairs (temporal patch 2), the last frame repeated when the count is odd.

A token budget bounds what one video costs the decoder (``plan_video``, in the spirit of
qwen-vl-utils' ``total_pixels``): a video that would take more has its frames shrunk, down to
``min_pixels``; below that floor, fewer frames are sampled, evenly over the clip, at the floor's
size. Either way a notice says what was done.

Decoding uses PyAV (``pip install av``) when installed, else OpenCV (``pip install opencv-python``).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import MimoError
from ..options import (
    DEFAULT_VIDEO_FPS,
    DEFAULT_VIDEO_MAX_FRAMES,
    DEFAULT_VIDEO_MAX_PIXELS,
    DEFAULT_VIDEO_MAX_TOKENS,
    DEFAULT_VIDEO_MIN_PIXELS,
)
from .images import (
    DEFAULT_CONFIG,
    ImageProcessorConfig,
    check_image_size,
    load_image,
    normalize,
    patchify,
    pixel_range,
    resize_rgb,
    smart_resize,
    to_rgb,
)

VIDEO_PIXEL_NAMES = ("video_min_pixels", "video_max_pixels")  # the options, for messages
VIDEO_MIN_FRAMES = 4  # qwen-vl-utils: sample at least this many frames from a long-enough clip

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def natural_key(name: str) -> list[int | str]:
    """Sort key that puts frame_2 before frame_10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def sample_frame_indices(
    total_frames: int,
    video_fps: float,
    fps: float = DEFAULT_VIDEO_FPS,
    max_frames: int = DEFAULT_VIDEO_MAX_FRAMES,
    min_frames: int = VIDEO_MIN_FRAMES,
    frame_factor: int = 2,
) -> np.ndarray:
    """Indices of the frames to keep, as qwen-vl-utils' ``smart_nframes`` + ``linspace().round()``.

    The count is duration * fps clamped to [min_frames, max_frames] and to the video's length, then
    floored to a multiple of ``frame_factor`` so frames pair up without padding. A clip (or a
    max_frames) shorter than one temporal patch keeps the frames it has; preprocessing then repeats
    the last frame to fill the patch, as transformers' video processor does.
    """
    if total_frames < 1:
        raise MimoError("the video has no frames")
    factor_min = math.ceil(min_frames / frame_factor) * frame_factor
    factor_max = math.floor(min(max_frames, total_frames) / frame_factor) * frame_factor
    wanted = total_frames / video_fps * fps
    nframes = min(max(wanted, factor_min), factor_max, total_frames)
    nframes = math.floor(nframes / frame_factor) * frame_factor
    if nframes < frame_factor:
        nframes = min(total_frames, max_frames)
    # numpy rounds half to even like torch; float64 linspace matches torch's float32 one on the
    # indices that matter (checked against torch in the tests).
    return np.round(np.linspace(0, total_frames - 1, nframes)).astype(np.int64)


def video_tokens(frames: int, size: tuple[int, int], config: ImageProcessorConfig) -> int:
    """Decoder tokens of `frames` frames of (height, width) pixels: one per merged patch of each
    temporal patch (the last frame repeated to fill the last one)."""
    side = config.patch_size * config.merge_size
    patches = -(-frames // config.temporal_patch_size)
    return patches * (size[0] // side) * (size[1] // side)


@dataclass(frozen=True)
class VideoPlan:
    """How many frames to sample and the (height, width) to resize them to; `notice` says what
    the token budget changed (None: nothing)."""

    frames: int
    size: tuple[int, int]
    notice: str | None = None

    def tokens(self, config: ImageProcessorConfig) -> int:
        return video_tokens(self.frames, self.size, config)


def plan_video(
    frames: int,
    height: int,
    width: int,
    max_tokens: int = DEFAULT_VIDEO_MAX_TOKENS,
    config: ImageProcessorConfig = DEFAULT_CONFIG,
    min_pixels: int | None = DEFAULT_VIDEO_MIN_PIXELS,
    max_pixels: int | None = DEFAULT_VIDEO_MAX_PIXELS,
) -> VideoPlan:
    """Fit `frames` frames of height x width pixels into `max_tokens` decoder tokens.

    Within the budget the frames get their usual size (smart_resize between min_pixels and
    max_pixels). Over it, they shrink to the largest smart_resize size whose tokens fit, down to
    the floor: the size smart_resize gives at min_pixels (what transformers' processor gives
    with min_pixels = max_pixels = min_pixels; rounding to whole patches may leave it a little
    below). Below the floor the frames keep its size, and only as many frames (whole temporal
    patches) as fit are kept, for the caller to sample evenly over the clip. A budget below one
    temporal patch at the floor is an error.

    Worked example (the defaults: 100,352 to 200,704 pixels a frame, 16,384 tokens), a 1280x720
    clip: its frames are 588x336 (21 x 12 = 252 tokens a pair). 128 frames take 16,128 tokens
    and stay as they are. 256 frames would take 32,256: 16,384 // 128 pairs = 128 tokens a pair,
    100,352 pixels, the floor itself, 420x224 (120 tokens): 15,360. 512 frames: 64 tokens a pair
    is below the floor, so 16,384 // 120 = 136 pairs at 420x224 are kept: 272 frames.
    """
    lo, hi = pixel_range(config, min_pixels, max_pixels, VIDEO_PIXEL_NAMES)
    factor = config.patch_size * config.merge_size
    check_image_size(width, height, factor, name="video frame")
    size = smart_resize(height, width, factor, lo, hi)
    wanted = video_tokens(frames, size, config)
    if wanted <= max_tokens:
        return VideoPlan(frames, size)
    over = (
        f"{frames} frames at {size[1]}x{size[0]} would take {wanted} tokens, more than "
        f"video_max_tokens ({max_tokens})"
    )
    floor = smart_resize(height, width, factor, lo, lo)
    patches = -(-frames // config.temporal_patch_size)
    allowance = (max_tokens // patches) * factor * factor  # pixels a frame may have
    if allowance >= floor[0] * floor[1]:
        shrunk = smart_resize(height, width, factor, min(lo, allowance), min(hi, allowance))
        if video_tokens(frames, shrunk, config) <= max_tokens:
            return VideoPlan(frames, shrunk, f"{over}: frames shrunk to {shrunk[1]}x{shrunk[0]}")
    per_patch = video_tokens(config.temporal_patch_size, floor, config)
    kept = (max_tokens // per_patch) * config.temporal_patch_size
    if kept == 0:
        raise MimoError(
            f"video_max_tokens ({max_tokens}) is less than one pair of frames at the smallest "
            f"frame size, {floor[1]}x{floor[0]} ({per_patch} tokens); raise video_max_tokens "
            "or lower video_min_pixels"
        )
    shrunk = f"frames shrunk to {floor[1]}x{floor[0]} (video_min_pixels)"
    if kept >= frames:  # a size between the floor and the allowance rounded up past it
        return VideoPlan(frames, floor, f"{over}: {shrunk}")
    fewer = f"{kept} of the {frames} frames kept, evenly spaced"
    notice = f"{over}: {fewer}" if floor == size else f"{over}: {shrunk} and {fewer}"
    return VideoPlan(kept, floor, notice)


class FrameResizer:
    """Resizes every frame of one video to one size: `size` (height, width) if given, else the
    smart_resize size of its first frame."""

    def __init__(
        self,
        config: ImageProcessorConfig,
        min_pixels: int | None,
        max_pixels: int | None,
        size: tuple[int, int] | None = None,
    ) -> None:
        self.config = config
        self.pixel_range = pixel_range(config, min_pixels, max_pixels, VIDEO_PIXEL_NAMES)
        self.size = size  # (height, width), else fixed by the first frame

    def __call__(self, frame: Image.Image | np.ndarray) -> np.ndarray:
        """One frame (PIL image or (H, W, 3) uint8 RGB array) -> (height, width, 3) uint8."""
        if isinstance(frame, Image.Image):
            image = to_rgb(frame)
        elif frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[-1] == 3:
            image = Image.fromarray(frame)
        else:
            raise MimoError(
                f"video frames must be (H, W, 3) uint8 RGB arrays, got {frame.shape} {frame.dtype}"
            )
        if self.size is None:
            check_image_size(image.width, image.height, self.config.factor, name="video frame")
            self.size = smart_resize(
                image.height, image.width, self.config.factor, *self.pixel_range
            )
        return resize_rgb(image, *self.size, self.config.resample)


def _decoder() -> str:
    """Name of the first installed video decoder, or a MimoError saying what to install."""
    try:
        import av.logging

        av.logging.set_level(av.logging.PANIC)  # ffmpeg's own complaints are not for the user
        return "av"
    except ImportError:
        pass
    # Read by OpenCV when it loads: ffmpeg's lines ("moov atom not found") and OpenCV's own stay
    # off the user's terminal unless they asked for them.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    os.environ.setdefault("OPENCV_LOG_LEVEL", "SILENT")
    try:
        import cv2  # noqa: F401

        return "cv2"
    except ImportError:
        pass
    raise MimoError("decoding video files needs PyAV: pip install av (or opencv-python)")


def _probe(path: Path, decoder: str) -> tuple[int, float]:
    """(frame count from the container, 0 if unknown; frames per second)."""
    if decoder == "av":
        import av

        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MimoError(f"{path} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            return int(stream.frames or 0), float(rate or 0)
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise MimoError(f"{path} could not be opened as a video")
        return int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), float(capture.get(cv2.CAP_PROP_FPS))
    finally:
        capture.release()


def _frames(path: Path, decoder: str) -> Iterator[Callable[[], np.ndarray]]:
    """Yield one thunk per decoded frame; calling it gives (H, W, 3) RGB uint8 (only when kept)."""
    if decoder == "av":
        import av

        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                yield lambda frame=frame: frame.to_ndarray(format="rgb24")
        return
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        while capture.grab():
            yield lambda: cv2.cvtColor(capture.retrieve()[1], cv2.COLOR_BGR2RGB)
    finally:
        capture.release()


def _collect(
    path: Path, decoder: str, indices: np.ndarray, resize: FrameResizer
) -> tuple[list[np.ndarray], int]:
    """Decode and resize the frames at ``indices`` (sorted); also count the frames decoded."""
    wanted = np.bincount(indices, minlength=int(indices[-1]) + 1)  # a frame may be picked twice
    kept: list[np.ndarray] = []
    count = 0
    stream = _frames(path, decoder)
    try:
        for count, read in enumerate(stream, start=1):
            if wanted[count - 1]:
                kept.extend([resize(read())] * int(wanted[count - 1]))
            if count == len(wanted):  # stop decoding after the last kept frame
                break
    finally:
        stream.close()  # releases the decoder now rather than at garbage collection
    return kept, count


Planner = Callable[[int, int, int], VideoPlan]
"""plan(frames, height, width): `plan_video` with the caller's budget and limits."""


def _first_frame_size(path: Path, decoder: str) -> tuple[int, int]:
    stream = _frames(path, decoder)
    try:
        first = next(stream, None)
        if first is None:
            raise MimoError("the video has no frames")
        return first().shape[:2]
    finally:
        stream.close()


def _read_video_file(
    path: Path, fps: float, max_frames: int, plan: Planner, config: ImageProcessorConfig, limits
) -> tuple[list[np.ndarray], float, VideoPlan]:
    decoder = _decoder()
    factor = config.temporal_patch_size  # sample whole temporal patches, no padding

    def sampled(total: int) -> tuple[np.ndarray, VideoPlan]:
        indices = sample_frame_indices(total, video_fps, fps, max_frames, frame_factor=factor)
        chosen = plan(len(indices), *size)
        if chosen.frames < len(indices):  # over the budget: fewer frames, evenly over the clip
            indices = sample_frame_indices(
                total, video_fps, fps, chosen.frames, frame_factor=factor
            )
        return indices, chosen

    try:
        total, video_fps = _probe(path, decoder)
        if total <= 0:  # container without a frame count: count by decoding
            total = sum(1 for _ in _frames(path, decoder))
        if video_fps <= 0:
            raise MimoError(f"{path} reports no frame rate; extract frames to a folder instead")
        size = _first_frame_size(path, decoder)
        indices, chosen = sampled(total)
        resize = FrameResizer(config, *limits, size=chosen.size)
        frames, decoded = _collect(path, decoder, indices, resize)
        if len(frames) < len(indices):  # the container over-reported its length: sample again
            total = decoded
            indices, chosen = sampled(total)
            resize = FrameResizer(config, *limits, size=chosen.size)
            frames, _ = _collect(path, decoder, indices, resize)
    except MimoError:
        raise
    except Exception as err:  # decoders raise their own error types for corrupt files
        raise MimoError(f"{path} could not be decoded as a video ({decoder}): {err}") from err
    return frames, len(indices) / total * video_fps, chosen


def _read_frame_folder(
    folder: Path, fps: float, max_frames: int, plan: Planner, config: ImageProcessorConfig, limits
) -> tuple[list[np.ndarray], float, VideoPlan]:
    paths = sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: natural_key(p.name),
    )
    if not paths:
        raise MimoError(f"{folder} holds no image frames ({', '.join(IMAGE_SUFFIXES)})")
    first = load_image(paths[0])
    chosen = plan(min(len(paths), max_frames), first.height, first.width)
    if len(paths) > chosen.frames:  # thin out evenly; the kept frames are further apart in time
        keep = np.round(np.linspace(0, len(paths) - 1, chosen.frames)).astype(np.int64)
        fps = fps * len(keep) / len(paths)
        paths = [paths[i] for i in keep]
    resize = FrameResizer(config, *limits, size=chosen.size)
    return [resize(load_image(p)) for p in paths], fps, chosen


@dataclass(frozen=True)
class VideoClip:
    """Frames (T, H, W, 3) uint8 sampled at `fps`, and what the token budget changed (None:
    nothing), as a sentence naming the video."""

    frames: np.ndarray
    fps: float
    notice: str | None = None


def read_video(
    source: str | Path,
    fps: float = DEFAULT_VIDEO_FPS,
    max_frames: int = DEFAULT_VIDEO_MAX_FRAMES,
    config: ImageProcessorConfig = DEFAULT_CONFIG,
    *,
    min_pixels: int | None = DEFAULT_VIDEO_MIN_PIXELS,
    max_pixels: int | None = DEFAULT_VIDEO_MAX_PIXELS,
    max_tokens: int = DEFAULT_VIDEO_MAX_TOKENS,
) -> VideoClip:
    """Load a video file or a folder of frames, within `max_tokens` decoder tokens.

    A file is sampled uniformly at ``fps``; a folder's frames (natural filename order) are taken as
    already sampled at ``fps``; at most ``max_frames`` either way. All frames are resized to one
    size: the ``smart_resize`` size of the first, each holding between min_pixels and max_pixels
    pixels (None: the config's limit), or smaller, or fewer frames, as `plan_video` fits them into
    `max_tokens`. The clip's ``fps`` is the rate of the returned frames. Frames are resized as
    they are decoded, so long 4K clips fit in memory.
    """
    source = Path(source)
    if source.is_file() and source.suffix.lower() in IMAGE_SUFFIXES:
        raise MimoError(f"{source} is an image, not a video: give it as an image")
    limits = pixel_range(config, min_pixels, max_pixels, VIDEO_PIXEL_NAMES)
    if fps <= 0 or max_frames < 1:
        raise MimoError(f"need fps > 0 and max_frames >= 1, got fps={fps}, max_frames={max_frames}")

    def plan(frames: int, height: int, width: int) -> VideoPlan:
        return plan_video(frames, height, width, max_tokens, config, *limits)

    if source.is_dir():
        frames, sample_fps, chosen = _read_frame_folder(
            source, fps, max_frames, plan, config, limits
        )
    elif source.is_file():
        frames, sample_fps, chosen = _read_video_file(source, fps, max_frames, plan, config, limits)
    else:
        raise MimoError(f"video not found: {source}")
    notice = f"{source.name}: {chosen.notice}" if chosen.notice else None
    return VideoClip(np.stack(frames), sample_fps, notice)


def load_video(
    source: str | Path,
    fps: float = DEFAULT_VIDEO_FPS,
    max_frames: int = DEFAULT_VIDEO_MAX_FRAMES,
    config: ImageProcessorConfig = DEFAULT_CONFIG,
    *,
    min_pixels: int | None = DEFAULT_VIDEO_MIN_PIXELS,
    max_pixels: int | None = DEFAULT_VIDEO_MAX_PIXELS,
    max_tokens: int = DEFAULT_VIDEO_MAX_TOKENS,
) -> tuple[np.ndarray, float]:
    """`read_video`'s (frames (T, H, W, 3) uint8, sample_fps); its notice, if any, as a warning.
    ``preprocess_video`` with ``size=frames.shape[1:3]`` leaves the frames as they are."""
    clip = read_video(
        source,
        fps,
        max_frames,
        config,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        max_tokens=max_tokens,
    )
    if clip.notice:
        warnings.warn(clip.notice, stacklevel=2)
    return clip.frames, clip.fps


def preprocess_video(
    frames: Sequence[Image.Image | np.ndarray] | np.ndarray,
    fps: float,
    config: ImageProcessorConfig = DEFAULT_CONFIG,
    *,
    min_pixels: int | None = DEFAULT_VIDEO_MIN_PIXELS,
    max_pixels: int | None = DEFAULT_VIDEO_MAX_PIXELS,
    size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Frames sampled at ``fps`` -> (pixel_values_videos (N, 1176) float32, video_grid_thw (1, 3)
    int64, second_per_grid_t).

    Frames are RGB uint8 arrays (H, W, 3) or PIL images; all are resized to the first frame's
    smart_resize size. ``second_per_grid_t`` = temporal_patch_size / fps: the seconds one temporal
    grid step spans, which the decoder's M-RoPE turns into time positions.
    """
    if fps <= 0:
        raise MimoError(f"fps must be positive, got {fps}")
    if len(frames) == 0:
        raise MimoError("a video needs at least one frame")
    resize = FrameResizer(config, min_pixels, max_pixels, size=size)
    pixels = np.stack([resize(frame) for frame in frames])
    patches, grid = patchify(normalize(pixels, config), config)
    return patches, grid[None], config.temporal_patch_size / fps
