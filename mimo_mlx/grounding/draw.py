"""Draw grounding results on a copy of the user's image: boxes, point markers, drag arrows, labels.

Coordinates are original-image pixels (``grounding_report.to_original``). Line widths, markers and the font
scale with the image, so the drawing reads the same on a 60 x 40 icon and a 4000 x 3000 photo.
Colours come from a fixed palette, one per label in order of first appearance.

Labels in Chinese, Japanese, Korean or other scripts need a font that has their glyphs: Pillow's
own font has ASCII only, so a label it cannot draw is drawn with a system font of wide coverage,
found at run time (PingFang or Hiragino on macOS, Noto CJK, WenQuanYi or DejaVu on Linux, Microsoft
YaHei on Windows). None is bundled; characters no installed font has are drawn as "?" and reported.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, features

from ..errors import MimoError, file_in_the_way
from ..inputs.images import load_image, to_rgb
from .parse import Action, Box, Point

RGB = tuple[int, int, int]

PALETTE: tuple[RGB, ...] = (
    (230, 25, 75),  # red
    (60, 180, 75),  # green
    (0, 130, 200),  # blue
    (245, 130, 48),  # orange
    (145, 30, 180),  # purple
    (70, 240, 240),  # cyan
    (240, 50, 230),  # magenta
    (210, 245, 60),  # lime
    (0, 128, 128),  # teal
    (170, 110, 40),  # brown
    (128, 0, 0),  # maroon
    (0, 0, 128),  # navy
)
"""Label colours, in the order labels first appear (boxes, then points, then actions)."""

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}

# Fonts with wide coverage that systems ship, best first (file names; .ttc: the first face).
WIDE_FONTS = (
    "PingFang.ttc",
    "Hiragino Sans GB.ttc",
    "STHeiti Medium.ttc",
    "NotoSansCJK-Regular.ttc",
    "NotoSansCJKsc-Regular.otf",
    "SourceHanSans-Regular.ttc",
    "Arial Unicode.ttf",
    "msyh.ttc",
    "wqy-zenhei.ttc",
    "wqy-microhei.ttc",
    "DroidSansFallbackFull.ttf",
    "AppleSDGothicNeo.ttc",
    "NotoSans-Regular.ttf",
    "DejaVuSans.ttf",
    "Arial.ttf",
)
FONT_FOLDERS = (
    "/System/Library/Fonts",
    "/Library/Fonts",
    "~/Library/Fonts",
    "/usr/share/fonts",
    "/usr/local/share/fonts",
    "~/.local/share/fonts",
    "~/.fonts",
    "C:/Windows/Fonts",
)
_INSTALL_FONT = (
    "install a font with wide coverage, e.g. Noto Sans CJK (Debian/Ubuntu: apt install "
    "fonts-noto-cjk)"
)


@dataclass(frozen=True)
class Style:
    """Sizes in pixels for one image: outline width, marker radius, font size, label padding."""

    line: int
    radius: int
    font_size: int
    pad: int

    @classmethod
    def for_size(cls, width: int, height: int) -> Style:
        # Scale with the geometric mean of the sides, so very thin images do not get huge fonts;
        # keep a label no taller than a third of the short side where possible.
        base = math.sqrt(width * height)
        line = max(1, round(base / 350))
        font_size = max(10, min(round(base / 40), min(width, height) // 3))
        return cls(line=line, radius=max(4, 5 * line), font_size=font_size, pad=max(1, line))


def annotate(
    image: str | Path | Image.Image,
    boxes: Sequence[Box],
    points: Sequence[Point],
    out_path: str | Path,
    actions: Sequence[Action] = (),
    report: Callable[[str], None] | None = None,
) -> Path:
    """Write a copy of `image` with `boxes`, `points` and `actions` drawn on it; return its path.

    A path is opened as the model saw it (upright: EXIF orientation applied, RGB); a PIL image is
    drawn as it is. The format follows `out_path`'s suffix (.png, .jpg/.jpeg, .webp). The input
    image is never overwritten. What could not be drawn (characters no installed font has) is
    told to `report`, one line each (default: a warning).
    """
    out = Path(out_path)
    image_format = check_destination(image, out)
    if isinstance(image, Image.Image):
        picture = to_rgb(image)  # a new image: the caller's stays untouched
    elif isinstance(image, str | Path):
        picture = load_image(image)
    else:
        raise MimoError(f"expected a PIL image or an image path, got {type(image).__name__}")
    notes = _draw(picture, list(boxes), list(points), list(actions))
    _save(picture, out, image_format)
    for note in notes:
        if report is not None:
            report(note)
        else:
            warnings.warn(note, stacklevel=2)
    return out


def check_destination(image: str | Path | Image.Image, out_path: str | Path) -> str:
    """The image format `out_path` asks for; MimoError if it cannot be written or would replace
    the input. Cheap, so a command can check before it spends minutes generating."""
    out = Path(out_path)
    image_format = _output_format(out)
    source = Path(image) if isinstance(image, str | Path) else _pil_source(image)
    if source is not None and _same_file(source, out):
        raise MimoError(
            f"refusing to overwrite the input image {source}; choose another output path"
        )
    if not out.parent.is_dir():
        in_the_way = file_in_the_way(out.parent)
        if in_the_way is not None:
            raise MimoError(f"cannot write {out}: {in_the_way} is a file, not a folder")
        raise MimoError(f"cannot write {out}: the folder {out.parent} does not exist")
    return image_format


def colours_for(labels: Sequence[str]) -> dict[str, RGB]:
    """The palette colour of each distinct label, in order of first appearance."""
    colours: dict[str, RGB] = {}
    for label in labels:
        colours.setdefault(label, PALETTE[len(colours) % len(PALETTE)])
    return colours


# ---------------------------------------------------------------- files


def _output_format(out: Path) -> str:
    image_format = FORMATS.get(out.suffix.lower())
    if image_format is None:
        raise MimoError(f"cannot write {out}: name the annotated image .png, .jpg, .jpeg or .webp")
    if image_format == "WEBP" and not features.check("webp"):
        raise MimoError(f"cannot write {out}: this Pillow has no WebP support; use .png or .jpg")
    return image_format


def _pil_source(image: object) -> Path | None:
    filename = getattr(image, "filename", "")  # set by Image.open
    return Path(filename) if filename else None


def _same_file(source: Path, out: Path) -> bool:
    try:
        if out.exists() and source.exists() and os.path.samefile(source, out):
            return True  # also catches hard links and case-insensitive file systems
        return source.resolve() == out.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop, on older Pythons
        return source.absolute() == out.absolute()


def _save(picture: Image.Image, out: Path, image_format: str) -> None:
    if not out.parent.is_dir():
        raise MimoError(f"cannot write {out}: {out.parent} is not an existing folder")
    options = {"quality": 92} if image_format in ("JPEG", "WEBP") else {}
    try:
        picture.save(out, format=image_format, **options)
    except OSError as err:
        reason = err.strerror or str(err)
        raise MimoError(f"cannot write {out}: {reason}") from err


# ---------------------------------------------------------------- drawing


Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


@lru_cache(maxsize=16)
def _font(size: int) -> Font:
    try:
        return ImageFont.load_default(size=size)  # scalable since Pillow 10.1 (with FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


@lru_cache(maxsize=1)
def wide_fonts() -> tuple[Path, ...]:
    """The installed fonts of `WIDE_FONTS`, in its order (looked for once per process)."""
    wanted = {name.lower(): rank for rank, name in enumerate(WIDE_FONTS)}
    found: dict[int, Path] = {}
    for folder in FONT_FOLDERS:
        root = Path(folder).expanduser()
        if not root.is_dir():
            continue
        for parent, _, files in os.walk(root):
            for name in files:
                rank = wanted.get(name.lower())
                if rank is not None and rank not in found:
                    found[rank] = Path(parent) / name
    return tuple(found[rank] for rank in sorted(found))


@lru_cache(maxsize=64)
def _truetype(path: Path, size: int) -> ImageFont.FreeTypeFont | None:
    try:
        return ImageFont.truetype(str(path), size)
    except OSError:  # unreadable, or not a font after all
        return None


def _glyphs(font: Font, text: str) -> set[str]:
    """The characters of `text` that `font` has glyphs for (whitespace always): a glyph drawn
    like the one of an unassigned code point is the font's 'missing' box."""
    if not isinstance(font, ImageFont.FreeTypeFont):
        return {ch for ch in text if ord(ch) < 256}  # Pillow's bitmap font: Latin-1

    def shape(ch: str):
        mask = font.getmask(ch)
        return mask.size, bytes(mask)

    missing = shape("\U0010fffd")
    return {ch for ch in set(text) if ch.isspace() or shape(ch) != missing}


def font_for(text: str, size: int) -> tuple[Font, set[str]]:
    """The font to draw `text` with, and the characters it still lacks: Pillow's own font when
    it has every glyph, else the first wide-coverage system font that does, else the one that
    lacks the fewest."""
    best, lacking = _font(size), set(text) - _glyphs(_font(size), text)
    for path in wide_fonts() if lacking else ():
        font = _truetype(path, size)
        if font is None:
            continue
        missing = set(text) - _glyphs(font, text)
        if len(missing) < len(lacking):
            best, lacking = font, missing
        if not lacking:
            break
    return best, lacking


def _draw(
    picture: Image.Image, boxes: list[Box], points: list[Point], actions: list[Action]
) -> list[str]:
    """Draw everything; what could not be drawn, one line each."""
    boxes, points, actions = _near_the_image(picture.size, boxes, points, actions)
    style = Style.for_size(*picture.size)
    draw = ImageDraw.Draw(picture)
    colours = colours_for(
        [b.label for b in boxes] + [p.label for p in points] + [a.label for a in actions]
    )
    labels: list[tuple[str, Box | Point, RGB]] = []  # drawn last, over every shape
    notes = [
        f"the action {a.label!r} has no point on the image: nothing is drawn for it"
        for a in actions
        if a.start is None
    ]
    for box in boxes:
        _rectangle(draw, box, colours[box.label], style.line)
        labels.append((box.label, box, colours[box.label]))
    for action in actions:
        if action.start is None:
            continue
        colour = colours[action.label]
        if action.end is not None:
            _arrow(draw, action.start, action.end, colour, style)
        _marker(draw, action.start, colour, style)
        labels.append((action.label, action.start, colour))
    for point in points:
        _marker(draw, point, colours[point.label], style)
        labels.append((point.label, point, colours[point.label]))
    # Labels keep off every marker's centre and off each other where the image has room.
    taken = [(round(p.x), round(p.y), round(p.x), round(p.y)) for _, p, _ in labels[len(boxes) :]]
    for text, where, colour in labels:
        if not text:
            continue
        text = " ".join(text.split())
        font, missing = font_for(text, style.font_size)
        if missing:
            shown = "".join(sorted(missing))
            notes.append(
                f"the label {text!r} was drawn with '?' for {shown!r}: no installed font has "
                f"those characters; {_INSTALL_FONT}"
            )
            text = "".join("?" if ch in missing else ch for ch in text)
        taken.append(_label(draw, picture.size, text, where, colour, font, style, taken))
    return notes


def _near_the_image(size, boxes: list[Box], points: list[Point], actions: list[Action]):
    """Coordinates clamped to a band around the image: far-off ones (an answer that was never
    mapped, say) would overflow Pillow's integer drawing. What lies inside the image is unchanged.
    """
    width, height = size

    def near(value: float, limit: int) -> float:
        return -limit if math.isnan(value) else min(max(value, -limit), 2 * limit)

    def point(p: Point | None) -> Point | None:
        return None if p is None else replace(p, x=near(p.x, width), y=near(p.y, height))

    boxes = [
        replace(
            b,
            x1=near(b.x1, width),
            y1=near(b.y1, height),
            x2=near(b.x2, width),
            y2=near(b.y2, height),
        )
        for b in boxes
    ]
    actions = [replace(a, start=point(a.start), end=point(a.end)) for a in actions]
    return boxes, [point(p) for p in points], actions


def _rectangle(draw: ImageDraw.ImageDraw, box: Box, colour: RGB, line: int) -> None:
    # The outline is centred on the box's edges: pixels x1 .. x2-1 are the box's own columns.
    half = line // 2
    x1, y1 = round(box.x1) - half, round(box.y1) - half
    x2, y2 = max(round(box.x2) - 1, round(box.x1)), max(round(box.y2) - 1, round(box.y1))
    outer = (x1, y1, x2 + line - 1 - half, y2 + line - 1 - half)
    draw.rectangle(outer, outline=colour, width=line)


def _marker(draw: ImageDraw.ImageDraw, point: Point, colour: RGB, style: Style) -> None:
    """A ring with a cross through its centre: visible on any background, exact at the centre."""
    x, y, r = round(point.x), round(point.y), style.radius
    draw.ellipse((x - r, y - r, x + r, y + r), outline=colour, width=style.line)
    arm = r + 2 * style.line
    draw.line((x - arm, y, x + arm, y), fill=colour, width=style.line)
    draw.line((x, y - arm, x, y + arm), fill=colour, width=style.line)


def _arrow(draw: ImageDraw.ImageDraw, start: Point, end: Point, colour: RGB, style: Style):
    """A line from start to end with a filled head at end (a drag or a scroll)."""
    dx, dy = end.x - start.x, end.y - start.y
    length = math.hypot(dx, dy)
    if length < 1:
        return
    head = min(max(8.0, 5.0 * style.line), length)
    ux, uy = dx / length, dy / length
    base = (end.x - ux * head, end.y - uy * head)
    draw.line((start.x, start.y, *base), fill=colour, width=style.line)
    wing = head * 0.5
    draw.polygon(
        [
            (end.x, end.y),
            (base[0] - uy * wing, base[1] + ux * wing),
            (base[0] + uy * wing, base[1] - ux * wing),
        ],
        fill=colour,
    )


def _label(draw, size, text: str, where: Box | Point, colour: RGB, font, style: Style, taken):
    """`text` on a filled background beside a box or marker, inside the image; its rectangle."""
    text = _fitted(draw, text, font, size[0] - 2 * style.pad)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left + 2 * style.pad, bottom - top + 2 * style.pad
    x, y = _placed(_slots(where, w, h, size[0], style), w, h, size, taken)
    draw.rectangle((x, y, x + w - 1, y + h - 1), fill=colour)
    dark = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 150
    ink = (0, 0, 0) if dark else (255, 255, 255)
    draw.text((x + style.pad - left, y + style.pad - top), text, font=font, fill=ink)
    return x, y, x + w - 1, y + h - 1


def _slots(where: Box | Point, w: int, h: int, width: int, style: Style) -> list[tuple[int, int]]:
    """Top-left corners to try for a w x h label, best first."""
    if isinstance(where, Box):  # above the top-left corner, else just inside the top edge
        half = style.line // 2
        x = min(max(round(where.x1) - half, 0), max(width - w, 0))
        return [(x, round(where.y1) - half - h), (x, round(where.y1) - half + style.line)]
    # Beside a marker, clear of its ring and cross: above right, above left, below right, below left.
    x, y, gap = round(where.x), round(where.y), style.radius + 2 * style.line + 1
    return [
        (x + gap, y - gap - h),
        (x - gap - w, y - gap - h),
        (x + gap, y + gap),
        (x - gap - w, y + gap),
    ]


def _placed(slots, w: int, h: int, size: tuple[int, int], taken) -> tuple[int, int]:
    """The first slot inside the image clear of `taken` rectangles, else inside, else moved in."""
    width, height = size
    inside = [(x, y) for x, y in slots if 0 <= x <= width - w and 0 <= y <= height - h]
    for x, y in inside:
        clear = all(
            x > x1 or x + w - 1 < x0 or y > y1 or y + h - 1 < y0 for x0, y0, x1, y1 in taken
        )
        if clear:
            return x, y
    if inside:
        return inside[0]
    x, y = slots[0]
    return min(max(x, 0), max(width - w, 0)), min(max(y, 0), max(height - h, 0))


def _fitted(draw: ImageDraw.ImageDraw, text: str, font, limit: int) -> str:
    """`text`, shortened with an ellipsis until it is at most `limit` pixels wide."""
    width = draw.textlength(text, font=font)
    if width <= limit or len(text) <= 1:
        return text
    ellipsis = "…" if isinstance(font, ImageFont.FreeTypeFont) else "..."
    keep = max(1, int(len(text) * limit / width))  # a proportional first guess, then trim
    while keep > 1 and draw.textlength(text[:keep] + ellipsis, font=font) > limit:
        keep -= 1
    return text[:keep] + ellipsis
