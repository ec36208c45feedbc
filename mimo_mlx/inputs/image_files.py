"""Image files as mimo-mlx reads them: a short list of formats, checked from the header before any
pixel is decoded, then decoded upright and RGB.

Formats: PNG, JPEG, WebP, GIF, BMP and TIFF, plus HEIC/HEIF where pillow-heif is installed
(`pip install "mimo-mlx[heic]"`). Every other file is refused by name before PIL's reader for it
runs: PIL knows dozens of formats, and some hand the file to other programs (EPS to Ghostscript).
Naming a refused format uses only the readers' magic-byte checks, never the readers.

`load_image` decodes a file at full size, as transformers' processor would see it (the command
line and the library). `EncodedImage` is what the server holds for a request: the file's bytes,
checked from the header; it decodes one image when the request runs, shrinking very large ones
while decoding (see `EncodedImage.decode`).
"""

from __future__ import annotations

import contextlib
import io
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import MimoError

BASE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
"""PIL's names of the formats read everywhere; HEIF joins them where pillow-heif is installed."""

MAX_IMAGE_PIXELS = 16384 * 16384
"""Largest image decoded (268 MP). PIL refuses images above 179 MP as decompression bombs, but
phone cameras reach 200 MP (16320 x 12240); a 268 MP RGB image decodes to 0.8 GB."""

MAX_ASPECT_RATIO = 200  # smart_resize's limit: thinner images cannot keep their shape on the grid
STRIP_PIXELS = 1 << 22  # larger images are converted and reduced 4 MP of rows at a time
REDUCING_GAP = 3
"""A shrunk decode stays at least this many times the target size on each side: PIL's own advice
for `reducing_gap` (from 3 on, "indistinguishable from fair resampling in most cases")."""

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# EXIF orientation -> the transposition that makes the image upright (as ImageOps applies it).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")
_FORMAT_NAMES = {"WEBP": "WebP", "HEIF": "HEIC"}


class ImageTooLarge(MimoError):
    """An image with more pixels than the reader allows (found from its header)."""


def image_formats() -> tuple[str, ...]:
    """PIL's names of the formats mimo-mlx opens: `BASE_FORMATS`, and HEIF if pillow-heif is
    installed (registering its reader with PIL the first time)."""
    try:
        import pillow_heif  # noqa: PLC0415  (an optional extra)
    except ImportError:
        return BASE_FORMATS
    if "HEIF" not in Image.OPEN:
        pillow_heif.register_heif_opener()
    return (*BASE_FORMATS, "HEIF")


def formats_text() -> str:
    """The formats read, for messages: "PNG, JPEG, WebP, GIF, BMP and TIFF"."""
    names = [_FORMAT_NAMES.get(name, name) for name in image_formats()]
    return ", ".join(names[:-1]) + " and " + names[-1]


def _name_format(prefix: bytes) -> str | None:
    """The format a file's first bytes say it is, by PIL's magic checks alone (no reader runs)."""
    if prefix[4:8] == b"ftyp" and prefix[8:12] in _HEIF_BRANDS:
        return "HEIF"
    Image.init()
    for name, (_, accept) in Image.OPEN.items():
        if accept is not None and accept(prefix):
            return name
    return None


def _refusal(name: str, prefix: bytes) -> MimoError:
    found = _name_format(prefix)
    if found in image_formats():  # its reader was asked and could not parse the header
        return MimoError(
            f"{name} is not a readable image: its {_FORMAT_NAMES.get(found, found)} header is "
            "damaged"
        )
    if found == "HEIF":
        return MimoError(
            f"{name} is a HEIC image; reading it needs pillow-heif: "
            'pip install "mimo-mlx[heic]" (or send PNG or JPEG)'
        )
    if found is None:
        return MimoError(f"{name} is not a readable image: mimo-mlx reads {formats_text()}")
    return MimoError(
        f"{name} is in {_FORMAT_NAMES.get(found, found)} format, which mimo-mlx does not open; "
        f"it reads {formats_text()}"
    )


_PIL_LIMIT_LOCK = threading.RLock()


@contextlib.contextmanager
def _own_pixel_limit() -> Iterator[None]:
    """PIL's decompression-bomb check off (and its warning silenced) while an image mimo-mlx
    checks itself is opened and decoded."""
    with _PIL_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


@contextlib.contextmanager
def open_image(source: Path | bytes, name: str, max_pixels: int) -> Iterator[Image.Image]:
    """The image in a file or in bytes, opened lazily (header read, nothing decoded) by the reader
    of an allowed format only. MimoError names any other format, or a size past `max_pixels`;
    PIL's own pixel limit is off inside (the caller's applies)."""
    with _own_pixel_limit():
        data = io.BytesIO(source) if isinstance(source, bytes) else source
        try:
            opened = Image.open(data, formats=image_formats())
        except OSError as err:  # UnidentifiedImageError included: no allowed reader took it
            if isinstance(source, bytes):
                prefix = source[:16]
            else:
                try:
                    with open(source, "rb") as file:
                        prefix = file.read(16)
                except OSError:
                    raise MimoError(f"{name} cannot be read ({err.strerror or 'error'})") from None
            raise _refusal(name, prefix) from None
        except (ValueError, SyntaxError):  # a header PIL cannot parse
            raise MimoError(f"{name} is not a readable image: its header is damaged") from None
        with opened:
            width, height = opened.size
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"{name} is {width}x{height} pixels ({width * height / 1e6:.0f} MP), above "
                    f"the {max_pixels / 1e6:.0f} MP mimo-mlx decodes; scale it down first"
                )
            yield opened


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as upright RGB: first frame, EXIF orientation applied, alpha on white."""
    path = Path(path)
    if path.is_dir():
        raise MimoError(f"{path} is a folder, not an image (a folder of video frames is a video)")
    if not path.is_file():
        raise MimoError(f"image not found: {path}")
    return decode_image(path, str(path))


def decode_image(source: Path | bytes, name: str) -> Image.Image:
    """An image file's (or its bytes') first frame as upright RGB at full size: EXIF orientation
    applied, alpha on white. `name` says which image in messages."""
    with open_image(source, name, MAX_IMAGE_PIXELS) as opened, _damaged(name):
        opened.load()  # decode now so a truncated file fails here
        image = ImageOps.exif_transpose(opened)
    check_image_size(image.width, image.height, name=name)
    return to_rgb(image)


@contextlib.contextmanager
def _damaged(name: str) -> Iterator[None]:
    """PIL's errors while decoding (or reading EXIF) as one MimoError, with no object reprs."""
    try:
        yield
    except (OSError, ValueError, SyntaxError, EOFError, IndexError):  # how PIL reports bad data
        raise MimoError(f"{name} could not be decoded: the file is damaged or truncated") from None


def to_rgb(image: Image.Image, scale_deep: bool | None = None) -> Image.Image:
    """Convert any PIL mode to RGB the way transformers' ``convert_to_rgb`` does.

    Transparency (an alpha band, or a palette/grey ``transparency`` entry) is composited onto
    white. One deliberate difference: 16/32-bit integer images holding values above 255 are
    scaled to 8 bits (x / 257) where PIL, and so transformers, would clip them to near-white
    (`scale_deep` decides instead, for an image shrunk from one whose values were looked at).
    An image over `STRIP_PIXELS` is converted a band of rows at a time, which gives the same
    pixels (each step is per pixel) but holds only the image, its RGB copy and one band.
    """
    deep = scale_deep
    if deep is None:
        deep = image.mode in _SIXTEEN_BIT_MODES and image.getextrema()[1] > 255
    width, height = image.size
    if width * height <= STRIP_PIXELS:
        return _to_rgb(image, deep)
    converted = Image.new("RGB", image.size)
    for top, bottom in _strips(width, height):
        converted.paste(_to_rgb(image.crop((0, top, width, bottom)), deep), (0, top))
    return converted


def _to_rgb(image: Image.Image, deep: bool) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES and deep:
        values = np.asarray(image)
        scaled = np.round(np.clip(values.astype(np.float64), 0, 65535) / 257)
        image = Image.fromarray(scaled.astype(np.uint8))
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _strips(width: int, height: int, multiple: int = 1) -> Iterator[tuple[int, int]]:
    """(top, bottom) rows of bands of about `STRIP_PIXELS`, each a multiple of `multiple` tall
    (but the last)."""
    rows = max(multiple, STRIP_PIXELS // width // multiple * multiple)
    for top in range(0, height, rows):
        yield top, min(height, top + rows)


def check_image_size(width: int, height: int, factor: int = 28, name: str = "image") -> None:
    """Raise MimoError if an image is too small or too thin to become a patch grid."""
    if min(width, height) < factor:
        raise MimoError(
            f"{name} is {width}x{height} pixels; each side must be at least {factor} pixels"
        )
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise MimoError(
            f"{name} is {width}x{height} pixels; its aspect ratio "
            f"{max(width, height) / min(width, height):.0f}:1 exceeds {MAX_ASPECT_RATIO}:1; "
            "crop it first"
        )


# ---------------------------------------------------------------- the server's images

Target = Callable[[int, int], tuple[int, int]]
"""(upright height, width) -> the (height, width) the image will be resized to."""


@dataclass(frozen=True)
class EncodedImage:
    """An image file's bytes (or a path), checked from its header but not decoded.

    `EncodedImage.open` reads only the header: an allowed format, at most `max_pixels`, sides
    fit for a patch grid. `decode` does the work, once the image is needed.
    """

    source: bytes | Path = field(repr=False)
    name: str  # how messages call it, e.g. "'messages[0].content[1].image_url.url'"
    format: str
    size: tuple[int, int]  # (width, height) as stored, before EXIF orientation
    max_pixels: int

    @classmethod
    def open(cls, source: bytes | Path, name: str, max_pixels: int) -> EncodedImage:
        with open_image(source, name, max_pixels) as opened:
            image = cls(source, name, opened.format or "", opened.size, max_pixels)
        check_image_size(*image.size, name=name)  # symmetric: orientation does not matter
        return image

    def decode(self, target: Target) -> tuple[Image.Image, tuple[int, int]]:
        """(the image upright and RGB, its full upright (width, height)), shrunk while decoding
        when it is far larger than `target`: a JPEG decodes at 1/2, 1/4 or 1/8 scale (PIL's
        `draft`) and any image is box-reduced (`Image.reduce`), never below `REDUCING_GAP` times
        the target on either side. An image too small for that decodes exactly as `load_image`.
        One full-size bitmap at most exists, and only until it is reduced."""
        with open_image(self.source, self.name, self.max_pixels) as opened, _damaged(self.name):
            if opened.size != self.size:
                raise MimoError(f"{self.name} changed after it was checked")
            orientation = opened.getexif().get(0x0112, 1)  # a PNG decodes here if it must
            upright = self.size[::-1] if orientation in (5, 6, 7, 8) else self.size
            height, width = target(upright[1], upright[0])
            if orientation in (5, 6, 7, 8):
                height, width = width, height  # the target as the file stores the image
            wanted = (REDUCING_GAP * width, REDUCING_GAP * height)
            if self.size[0] >= 2 * wanted[0] and self.size[1] >= 2 * wanted[1]:
                opened.draft(None, wanted)  # JPEG: decode at a reduced scale; others: no-op
            opened.load()
            factor = min(opened.width // wanted[0], opened.height // wanted[1])
            if factor < 2 and opened.size == self.size:  # nothing to shrink: as load_image
                return to_rgb(ImageOps.exif_transpose(opened)), upright
            image = _reduced(opened, factor)
        if orientation in _UPRIGHT:
            image = image.transpose(_UPRIGHT[orientation])
        return image, upright


def _reduced(image: Image.Image, factor: int) -> Image.Image:
    """`image` box-reduced by `factor` (1: as it is), then RGB as `to_rgb` makes it. The image is
    reduced a band of rows at a time, so its converted copies are never full size: box averages
    of bands whose heights are multiples of `factor` are the whole image's."""
    deep = image.mode in _SIXTEEN_BIT_MODES and image.getextrema()[1] > 255
    if factor < 2:
        return to_rgb(image, scale_deep=deep)
    width, height = image.size
    pieces = [
        _reducible(image.crop((0, top, width, bottom))).reduce(factor)
        for top, bottom in _strips(width, height, multiple=factor)
    ]
    reduced = Image.new(pieces[0].mode, (-(-width // factor), -(-height // factor)))
    top = 0
    for piece in pieces:
        reduced.paste(piece, (0, top))
        top += piece.height
    return to_rgb(reduced, scale_deep=deep)


def _reducible(image: Image.Image) -> Image.Image:
    """`image` in a mode `Image.reduce` takes: transparency as an alpha band (reduce averages
    colours weighted by it), 1-bit as grey, 16-bit as 32-bit."""
    if image.mode == "P" or image.info.get("transparency") is not None:
        transparent = image.info.get("transparency") is not None or "A" in image.getbands()
        return image.convert("RGBA" if transparent else "RGB")
    if image.mode == "1":
        return image.convert("L")
    if image.mode in _SIXTEEN_BIT_MODES:
        return image.convert("I")
    return image
