"""Annotated images, checked pixel by pixel: shapes where the coordinates say, nothing elsewhere."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from mimo_mlx.errors import MimoError
from mimo_mlx.grounding import draw
from mimo_mlx.grounding.draw import PALETTE, Style, annotate, colours_for, font_for
from mimo_mlx.grounding.parse import Action, Box, Point, parse_grounding
from mimo_mlx.grounding.report import geometry_of, to_original

GREY = (128, 128, 128)


def drawn(tmp_path, size, boxes=(), points=(), actions=(), name="out.png") -> np.ndarray:
    out = annotate(Image.new("RGB", size, GREY), boxes, points, tmp_path / name, actions)
    with Image.open(out) as image:
        return np.asarray(image.convert("RGB"))


def colour_at(pixels: np.ndarray, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(v) for v in pixels[y, x])


def share(pixels: np.ndarray, x0: int, y0: int, x1: int, y1: int, colour) -> float:
    """The fraction of pixels in [x0, x1) x [y0, y1) that have `colour`."""
    region = pixels[y0:y1, x0:x1]
    return float(np.all(region == colour, axis=-1).mean())


def at(size: tuple[int, int], *fractions: float) -> list[int]:
    """Whole-pixel coordinates at fractions of the width, height, width, ..."""
    return [round(f * size[i % 2]) for i, f in enumerate(fractions)]


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("size", [(60, 40), (4000, 3000)])
def test_box_edges_are_where_the_box_is(tmp_path, size):
    x1, y1, x2, y2 = at(size, 0.2, 0.45, 0.7, 0.8)
    pixels = drawn(tmp_path, size, boxes=[Box(x1, y1, x2, y2)])  # no label: shapes only
    red, line = PALETTE[0], Style.for_size(*size).line
    ym, xm = (y1 + y2) // 2, (x1 + x2) // 2
    for x, y in [(x1, ym), (x2 - 1, ym), (xm, y1), (xm, y2 - 1)]:
        assert colour_at(pixels, x, y) == red, (x, y)
    away = 2 * line + 2  # just outside the outline, and just inside it
    for x, y in [
        (x1 - away, ym),
        (x1 + away, ym),
        (x2 + away, ym),
        (xm, y1 - away),
        (xm, y2 + away),
    ]:
        assert colour_at(pixels, x, y) == GREY, (x, y)
    assert colour_at(pixels, xm, ym) == GREY  # the box is not filled
    assert share(pixels, 0, 0, *size, red) < 0.1


@pytest.mark.parametrize("size", [(60, 40), (4000, 3000)])
def test_point_marker_is_centred_on_the_point(tmp_path, size):
    x, y = at(size, 0.75, 0.5)
    pixels = drawn(tmp_path, size, points=[Point(x, y)])
    red, style = PALETTE[0], Style.for_size(*size)
    assert colour_at(pixels, x, y) == red
    # The ring: red in every quadrant at the ring's radius, off the cross's arms; none inside it.
    near = 2 * style.radius  # a window around the point; the image may be 4000 x 3000
    dy, dx = np.mgrid[-near : near + 1, -near : near + 1]
    window = pixels[y - near : y + near + 1, x - near : x + near + 1]
    distance, red_mask = np.hypot(dx, dy), np.all(window == red, axis=-1)
    off_arms = (abs(dx) > style.line) & (abs(dy) > style.line)
    on_ring = off_arms & (abs(distance - style.radius) <= style.line + 1)
    for sx, sy in [(1, 1), (-1, 1), (1, -1), (-1, -1)]:
        assert red_mask[on_ring & (sx * dx > 0) & (sy * dy > 0)].mean() > 0.15
    assert not red_mask[off_arms & (distance < style.radius - style.line - 1)].any()
    reach = style.radius + 3 * style.line  # nothing beyond the ring and its cross
    for dx, dy in [(reach, reach), (-reach, reach), (reach, -reach), (-reach, -reach)]:
        assert colour_at(pixels, x + dx, y + dy) == GREY
    assert share(pixels, x - reach, y - reach, x + reach + 1, y + reach + 1, red) > 0.05


def test_drag_arrow_runs_from_start_to_end(tmp_path):
    start, end = Point(500, 1500, "drag"), Point(3000, 1500, "drag")
    pixels = drawn(tmp_path, (4000, 3000), actions=[Action("drag", start, end)])
    red = PALETTE[0]
    for x in range(700, 2900, 200):  # the shaft
        assert colour_at(pixels, x, 1500) == red
    head = Style.for_size(4000, 3000).line * 5
    assert colour_at(pixels, 3000 - head // 2, 1500 + head // 8) == red  # the head is wider
    assert colour_at(pixels, 3100, 1500) == GREY and colour_at(pixels, 1800, 1600) == GREY


def test_far_off_coordinates_draw_what_is_visible(tmp_path):
    # Unmapped or hand-made coordinates may lie far outside; Pillow must not see them as they are.
    far = [Box(-1e12, 20, 1e12, 60), Box(float("nan"), 1, float("inf"), 2)]
    drag = Action("drag", Point(-1e20, 70), Point(1e20, 70))
    pixels = drawn(tmp_path, (100, 80), boxes=far, points=[Point(1e15, -1e15)], actions=[drag])
    assert share(pixels, 0, 20, 100, 21, PALETTE[0]) == 1.0  # the top edge, across the image
    assert share(pixels, 0, 70, 100, 71, PALETTE[1]) == 1.0  # the shaft, in the colour of "drag"


def test_actions_without_a_point_draw_nothing_and_say_so(tmp_path):
    notes = []
    press = Action("press", arguments=(("keys", ["enter"]),))
    out = annotate(Image.new("RGB", (200, 100), GREY), [], [], tmp_path / "out.png", [press],
                   report=notes.append)  # fmt: skip
    with Image.open(out) as image:
        assert share(np.asarray(image.convert("RGB")), 0, 0, 200, 100, GREY) == 1.0
    assert notes == [
        f"the action {press.label!r} has no point on the image: nothing is drawn for it"
    ]


# ---------------------------------------------------------------- labels


@pytest.mark.parametrize("size", [(60, 40), (4000, 3000)])
def test_label_sits_on_a_filled_patch_next_to_its_box(tmp_path, size):
    x1, y1, x2, y2 = at(size, 0.2, 0.5, 0.6, 0.9)
    pixels = drawn(tmp_path, size, boxes=[Box(x1, y1, x2, y2, "cat")])
    style = Style.for_size(*size)
    above = pixels[: y1 - style.line]  # everything above the box's outline
    rows, cols = np.nonzero(np.all(above == PALETTE[0], axis=-1))
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    assert bottom >= y1 - style.line - 1 and abs(left - x1) <= style.line  # on the box's corner
    assert style.font_size * 0.8 <= bottom - top + 1 <= style.font_size * 2
    patch = pixels[top : bottom + 1, left : right + 1]
    ink = ~np.all(patch == PALETTE[0], axis=-1)  # anti-aliased text
    assert 0.05 < ink.mean() < 0.6  # text on a filled background
    assert share(pixels, x2 + 4, 0, *size, PALETTE[0]) == 0  # nothing right of the box


def test_labels_stay_inside_the_image_and_scale_with_it(tmp_path):
    long_label = "a label far too long to fit across this little picture"
    pixels = drawn(tmp_path, (60, 40), boxes=[Box(0, 0, 60, 40, long_label)])
    assert share(pixels, 0, 0, 60, 40, PALETTE[0]) > 0.2  # drawn, inside, shortened
    small, large = Style.for_size(60, 40), Style.for_size(4000, 3000)
    assert small.line == 1 and large.line >= 8
    assert 10 <= small.font_size <= 13 and large.font_size >= 60


@pytest.mark.parametrize("x, y", [(190, 8), (10, 8), (190, 110), (10, 110), (100, 60)])
def test_point_label_keeps_off_the_marker(tmp_path, x, y):
    # Wherever the point is, even in a corner, its label moves aside and leaves the marker whole.
    plain = drawn(tmp_path, (200, 120), points=[Point(x, y)], name="plain.png")
    labelled = drawn(tmp_path, (200, 120), points=[Point(x, y, "corner")], name="labelled.png")
    reach = Style.for_size(200, 120).radius + 2 * Style.for_size(200, 120).line
    around = (slice(max(0, y - reach), y + reach + 1), slice(max(0, x - reach), x + reach + 1))
    assert np.array_equal(plain[around], labelled[around])
    assert share(labelled, 0, 0, 200, 120, PALETTE[0]) > 2 * share(
        plain, 0, 0, 200, 120, PALETTE[0]
    )


def test_colours_follow_labels_in_order_of_appearance():
    assert colours_for(["cat", "dog", "cat", ""]) == {
        "cat": PALETTE[0],
        "dog": PALETTE[1],
        "": PALETTE[2],
    }
    many = colours_for([str(i) for i in range(len(PALETTE) + 1)])
    assert many[str(len(PALETTE))] == PALETTE[0]


def test_same_label_same_colour_on_the_image(tmp_path):
    pixels = drawn(
        tmp_path,
        (300, 100),
        boxes=[Box(10, 50, 60, 90), Box(110, 50, 160, 90, "dog"), Box(210, 50, 260, 90)],
    )
    assert colour_at(pixels, 10, 70) == PALETTE[0] == colour_at(pixels, 210, 70)
    assert colour_at(pixels, 110, 70) == PALETTE[1]


# ---------------------------------------------------------------- files


@pytest.mark.parametrize(
    "suffix, image_format",
    [(".png", "PNG"), (".JPG", "JPEG"), (".jpeg", "JPEG"), (".webp", "WEBP")],
)
def test_format_follows_the_suffix(tmp_path, suffix, image_format):
    out = annotate(
        Image.new("RGB", (64, 48)), [Box(5, 5, 30, 30, "x")], [], tmp_path / f"a{suffix}"
    )
    with Image.open(out) as image:
        assert image.format == image_format and image.size == (64, 48) and image.mode == "RGB"


def test_a_path_is_drawn_upright_like_the_model_saw_it(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to show
    Image.new("RGB", (120, 80), GREY).save(path, exif=exif)
    geometry = geometry_of(path)
    result = to_original(parse_grounding('{"bbox_2d": [0, 0, 20, 20], "label": "a"}'), geometry)
    out = annotate(path, result.boxes, result.points, tmp_path / "out.png")
    with Image.open(out) as image:
        assert image.size == (80, 120) == geometry.original_size


def test_caller_image_is_left_untouched(tmp_path):
    image = Image.new("RGB", (100, 80), GREY)
    annotate(image, [Box(10, 10, 50, 50, "x")], [Point(70, 40, "y")], tmp_path / "out.png")
    assert image.getcolors() == [(100 * 80, GREY)]


@pytest.mark.parametrize("name", ["out.gif", "out", "out.png.txt"])
def test_unknown_suffix_is_a_one_line_user_error(tmp_path, name):
    with pytest.raises(MimoError, match=r"\.png, \.jpg") as caught:
        annotate(Image.new("RGB", (64, 48)), [], [], tmp_path / name)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / name).exists()


def test_unwritable_paths_are_one_line_user_errors(tmp_path):
    image = Image.new("RGB", (64, 48))
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "folder.png").mkdir()
    for out in [
        tmp_path / "missing" / "out.png",
        tmp_path / "file.txt" / "out.png",
        tmp_path / "folder.png",
    ]:
        with pytest.raises(MimoError, match="cannot write") as caught:
            annotate(image, [], [], out)
        assert "\n" not in str(caught.value)


def test_the_input_image_is_never_overwritten(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), GREY).save(path)
    before = path.read_bytes()
    link = tmp_path / "link.png"
    os.symlink(path, link)
    attempts = [
        (path, path),
        (str(path), tmp_path / "." / "photo.png"),
        (link, path),
        (path, link),
        (Image.open(path), path),  # a PIL image remembers the file it came from
    ]
    for source, out in attempts:
        with pytest.raises(MimoError, match="overwrite"):
            annotate(source, [Box(1, 1, 20, 20, "x")], [], out)
    assert path.read_bytes() == before


# ---------------------------------------------------------------- scripts beyond ASCII


def label_patch(tmp_path, label: str, name: str, report=None) -> np.ndarray:
    """The label's patch above a box, drawn on its own image."""
    size, box = (400, 200), Box(40, 120, 360, 190, label)
    out = annotate(Image.new("RGB", size, GREY), [box], [], tmp_path / name, report=report)
    with Image.open(out) as image:
        return np.asarray(image.convert("RGB"))[:118]


def test_cjk_labels_are_drawn_with_their_glyphs_or_reported(tmp_path):
    """Two labels of different characters draw differently when a font has them; a font without
    them would draw the same 'missing' boxes for both, so that is reported instead."""
    notes = []
    exits = label_patch(tmp_path, "出出出", "a.png", notes.append)
    mouths = label_patch(tmp_path, "口口口", "b.png", notes.append)
    if font_for("出口", 20)[1]:  # no installed font has them (the report says so)
        assert len(notes) == 2 and "no installed font" in notes[0] and "出" in notes[0]
    else:
        assert notes == [] and not np.array_equal(exits, mouths)


def test_without_a_wide_font_the_label_says_what_it_could_not_draw(tmp_path, monkeypatch):
    monkeypatch.setattr(draw, "wide_fonts", lambda: ())
    notes = []
    label_patch(tmp_path, "Exit 出口", "c.png", notes.append)
    assert len(notes) == 1 and "'出口'" in notes[0] and "fonts-noto-cjk" in notes[0]
    with pytest.warns(UserWarning, match="no installed font"):
        label_patch(tmp_path, "出口", "d.png")


def test_ascii_labels_keep_pillows_font(tmp_path):
    font, missing = font_for("OK button", 20)
    assert missing == set() and font is draw._font(20)


def test_wide_fonts_are_found_where_systems_keep_them(tmp_path, monkeypatch):
    dejavu = next((f for f in draw.wide_fonts() if f.name == "DejaVuSans.ttf"), None)
    if dejavu is None:
        pytest.skip("DejaVuSans.ttf is not installed here")
    nested = tmp_path / "truetype" / "dejavu"
    nested.mkdir(parents=True)
    (nested / "DejaVuSans.ttf").write_bytes(dejavu.read_bytes())
    monkeypatch.setattr(draw, "FONT_FOLDERS", (str(tmp_path), str(tmp_path / "missing")))
    draw.wide_fonts.cache_clear()
    try:
        assert draw.wide_fonts() == (nested / "DejaVuSans.ttf",)
        font, missing = font_for("Ωж café", 20)  # Greek, Cyrillic, Latin-1: DejaVu has them
        assert missing == set() and font.path == str(nested / "DejaVuSans.ttf")
    finally:
        draw.wide_fonts.cache_clear()
