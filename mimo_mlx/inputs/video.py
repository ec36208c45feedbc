"""Video loading and preprocessing for MiMo-VL, following qwen-vl-utils' conventions.

Frames are sampled uniformly at ``fps`` (2 by default) from a video file, or taken as-is from a
folder of images that were already sampled at ``fps``. Every frame is resized to one
``smart_resize`` size and normalized exactly like an image (``images.py``); frames are grouped
in pairs (temporal patch 2), the last frame repeated when the count is odd.

Decoding uses PyAV (``pip install av``) when installed, else OpenCV (``pip install opencv-python``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import MimoError
from ..options import (
    DEFAULT_VIDEO_FPS,
    DEFAULT_VIDEO_MAX_FRAMES,
    DEFAULT_VIDEO_MAX_PIXELS,
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


class FrameResizer:
    """Resizes every frame of one video to the smart_resize size of its first frame."""

    def __init__(
        self, config: ImageProcessorConfig, min_pixels: int | None, max_pixels: int | None
    ) -> None:
        self.config = config
        names = ("video_min_pixels", "video_max_pixels")
        self.pixel_range = pixel_range(config, min_pixels, max_pixels, names)
        self.size: tuple[int, int] | None = None  # (height, width), fixed by the first frame

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


def _read_video_file(
    path: Path, fps: float, max_frames: int, resize: FrameResizer
) -> tuple[list[np.ndarray], float]:
    decoder = _decoder()
    factor = resize.config.temporal_patch_size  # sample whole temporal patches, no padding
    try:
        total, video_fps = _probe(path, decoder)
        if total <= 0:  # container without a frame count: count by decoding
            total = sum(1 for _ in _frames(path, decoder))
        if video_fps <= 0:
            raise MimoError(f"{path} reports no frame rate; extract frames to a folder instead")
        indices = sample_frame_indices(total, video_fps, fps, max_frames, frame_factor=factor)
        frames, decoded = _collect(path, decoder, indices, resize)
        if len(frames) < len(indices):  # the container over-reported its length: sample again
            total = decoded
            indices = sample_frame_indices(total, video_fps, fps, max_frames, frame_factor=factor)
            frames, _ = _collect(path, decoder, indices, resize)
    except MimoError:
        raise
    except Exception as err:  # decoders raise their own error types for corrupt files
        raise MimoError(f"{path} could not be decoded as a video ({decoder}): {err}") from err
    return frames, len(indices) / total * video_fps


def _read_frame_folder(
    folder: Path, fps: float, max_frames: int, resize: FrameResizer
) -> tuple[list[np.ndarray], float]:
    paths = sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: natural_key(p.name),
    )
    if not paths:
        raise MimoError(f"{folder} holds no image frames ({', '.join(IMAGE_SUFFIXES)})")
    if len(paths) > max_frames:  # thin out uniformly; the kept frames are further apart in time
        keep = np.round(np.linspace(0, len(paths) - 1, max_frames)).astype(np.int64)
        fps = fps * len(keep) / len(paths)
        paths = [paths[i] for i in keep]
    return [resize(load_image(p)) for p in paths], fps


def load_video(
    source: str | Path,
    fps: float = DEFAULT_VIDEO_FPS,
    max_frames: int = DEFAULT_VIDEO_MAX_FRAMES,
    config: ImageProcessorConfig = DEFAULT_CONFIG,
    *,
    min_pixels: int | None = DEFAULT_VIDEO_MIN_PIXELS,
    max_pixels: int | None = DEFAULT_VIDEO_MAX_PIXELS,
) -> tuple[np.ndarray, float]:
    """Load a video file or a folder of frames -> (frames (T, H, W, 3) uint8, sample_fps).

    A file is sampled uniformly at ``fps``; a folder's frames (natural filename order) are taken as
    already sampled at ``fps``. All frames are resized to the ``smart_resize`` size of the first
    one, each holding between min_pixels and max_pixels pixels, so ``preprocess_video`` with the
    same limits leaves them as they are (None: the config's limit). ``sample_fps`` is the rate of
    the returned frames. Frames are resized as they are decoded, so long 4K clips fit in memory.
    """
    source = Path(source)
    if source.is_file() and source.suffix.lower() in IMAGE_SUFFIXES:
        raise MimoError(f"{source} is an image, not a video: pass it with --image (images=[...])")
    resize = FrameResizer(config, min_pixels, max_pixels)
    if fps <= 0 or max_frames < 1:
        raise MimoError(f"need fps > 0 and max_frames >= 1, got fps={fps}, max_frames={max_frames}")
    if source.is_dir():
        frames, sample_fps = _read_frame_folder(source, fps, max_frames, resize)
    elif source.is_file():
        frames, sample_fps = _read_video_file(source, fps, max_frames, resize)
    else:
        raise MimoError(f"video not found: {source}")
    return np.stack(frames), sample_fps


def preprocess_video(
    frames: Sequence[Image.Image | np.ndarray] | np.ndarray,
    fps: float,
    config: ImageProcessorConfig = DEFAULT_CONFIG,
    *,
    min_pixels: int | None = DEFAULT_VIDEO_MIN_PIXELS,
    max_pixels: int | None = DEFAULT_VIDEO_MAX_PIXELS,
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
    resize = FrameResizer(config, min_pixels, max_pixels)
    pixels = np.stack([resize(frame) for frame in frames])
    patches, grid = patchify(normalize(pixels, config), config)
    return patches, grid[None], config.temporal_patch_size / fps
