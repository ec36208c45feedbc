"""Which image files are opened, and how the server's images decode: the format allowlist (shared
by the command line, the library and the server), refusals by name before any other reader runs,
and the shrinking decode of very large images, whose pixels stay within a stated bound of the
exact ones."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import EpsImagePlugin, Image, ImageDraw
from test_generate import write_model_folder

from mimo_mlx.cli.main import main
from mimo_mlx.errors import MimoError
from mimo_mlx.inputs import image_files
from mimo_mlx.inputs.image_files import EncodedImage, ImageTooLarge, decode_image, load_image
from mimo_mlx.inputs.images import ImageProcessorConfig, preprocess_encoded, preprocess_images
from mimo_mlx.inputs.messages import image_from_url

ALLOWED = ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"]


def encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like image: smooth colour, noise, and dark text (edges a resize must keep)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 64 + 2, width // 64 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
    noisy = np.clip(smooth.astype(np.int16) + rng.normal(0, 12, smooth.shape), 0, 255)
    image = Image.fromarray(noisy.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(60):
        x, y = int(rng.integers(0, width - 300)), int(rng.integers(0, height - 80))
        draw.text((x, y), "Hello world 123", fill=(0, 0, 0), font_size=int(rng.integers(20, 90)))
    return image


@pytest.mark.parametrize("fmt", ALLOWED)
def test_the_allowed_formats_open(fmt, tmp_path):
    path = tmp_path / f"photo.{fmt.lower()}"
    Image.new("RGB", (40, 30), "red").save(path, format=fmt)
    assert load_image(path).size == (40, 30)


@pytest.fixture
def ghostscript_never_runs(monkeypatch):
    """Fail the test if PIL's EPS reader (which starts Ghostscript to decode) is ever used."""

    def forbidden(*args, **kwargs):
        raise AssertionError("PIL's EPS reader ran")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", forbidden)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", forbidden)


def refused_files() -> dict[str, bytes]:
    small = Image.new("RGB", (40, 30), "red")
    return {
        "EPS": encoded(small, "EPS"),
        "ICO": encoded(small, "ICO"),
        "PPM": encoded(small, "PPM"),
        "PCX": encoded(small, "PCX"),
        "SGI": encoded(small, "SGI"),
    }


@pytest.mark.parametrize("name", sorted(refused_files()))
def test_other_formats_are_refused_by_name_and_no_other_reader_runs(
    name, tmp_path, ghostscript_never_runs
):
    data = refused_files()[name]
    path = tmp_path / "picture.png"  # the suffix does not matter: the bytes do
    path.write_bytes(data)
    expected = f"is in {name} format, which mimo-mlx does not open; it reads PNG, JPEG"
    for read in (lambda: load_image(path), lambda: decode_image(data, "it")):
        with pytest.raises(MimoError, match=expected):
            read()
    with pytest.raises(MimoError, match=expected):
        EncodedImage.open(data, "it", max_pixels=10**8)
    with pytest.raises(MimoError, match=expected):
        image_from_url(f"data:image/png;base64,{base64.b64encode(data).decode()}")


def test_the_command_line_refuses_an_eps_file_by_name(tmp_path, ghostscript_never_runs):
    path = tmp_path / "figure.eps"
    path.write_bytes(refused_files()["EPS"])
    folder = write_model_folder(tmp_path / "model", seed=21)
    args = ["generate", "--model", str(folder), "--image", str(path), "--prompt", "x"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "EPS format" in result.output
    assert "Traceback" not in result.output


def test_heic_needs_its_plugin(monkeypatch):
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    monkeypatch.setattr(image_files, "image_formats", lambda: image_files.BASE_FORMATS)
    with pytest.raises(
        MimoError, match=r'HEIC image; reading it needs pillow-heif: pip install "mimo'
    ):
        EncodedImage.open(heic, "it", max_pixels=10**8)


def test_heic_opens_where_pillow_heif_is_installed():
    pillow_heif = pytest.importorskip("pillow_heif")
    assert "HEIF" in image_files.image_formats() and "HEIC" in image_files.formats_text()
    data = io.BytesIO()
    pillow_heif.from_pillow(Image.new("RGB", (64, 48), "blue")).save(data, format="HEIF")
    assert decode_image(data.getvalue(), "it").size == (64, 48)


def test_garbage_and_damaged_files_say_so_without_object_reprs():
    with pytest.raises(MimoError) as caught:
        decode_image(b"hello, not an image", "'messages[0]'")
    assert "is not a readable image" in str(caught.value) and " at 0x" not in str(caught.value)
    png = encoded(picture(400, 300), "PNG")
    with pytest.raises(MimoError, match="could not be decoded: the file is damaged or truncated"):
        decode_image(png[: len(png) // 2], "it")


DAMAGED_HEADERS = {
    "PNG": b"\x89PNG\r\n\x1a\nnot really an image",
    "JPEG": b"\xff\xd8\xff\xe0 not really an image",
    "GIF": b"GIF89a\x00\x00\x00",
    "BMP": b"BM" + b"\x01" * 20,
    "WebP": b"RIFF\x10\x00\x00\x00WEBPVP8 not really",
}


@pytest.mark.parametrize("name", sorted(DAMAGED_HEADERS))
def test_a_damaged_file_of_a_format_read_is_called_damaged_not_refused(name, tmp_path):
    """A file that starts like a PNG but is not one is damaged: saying that mimo-mlx does not open
    PNG would be false."""
    data = DAMAGED_HEADERS[name]
    path = tmp_path / "photo.img"
    path.write_bytes(data)
    damaged = f"is not a readable image: its {name} header is damaged$"
    with pytest.raises(MimoError, match=f"^{re.escape(str(path))} {damaged}"):
        load_image(path)
    with pytest.raises(MimoError, match=f"^it {damaged}"):
        decode_image(data, "it")
    with pytest.raises(MimoError, match=f"^it {damaged}"):
        EncodedImage.open(data, "it", max_pixels=10**8)


def test_the_header_decides_before_any_pixel_is_decoded():
    huge = encoded(Image.new("1", (20000, 20000)), "PNG")  # 400 MP, a few kB as PNG
    with pytest.raises(ImageTooLarge, match="20000x20000 pixels"):
        EncodedImage.open(huge, "it", max_pixels=64 * 10**6)
    with pytest.raises(MimoError, match="at least 28 pixels"):
        EncodedImage.open(encoded(Image.new("RGB", (10, 10)), "PNG"), "it", max_pixels=10**8)
    checked = EncodedImage.open(encoded(Image.new("RGB", (300, 200)), "JPEG"), "it", 10**8)
    assert (checked.format, checked.size) == ("JPEG", (300, 200))


# ---------------------------------------------------------------- the server's decoding

CONFIG = ImageProcessorConfig()


def exact_and_encoded(image: Image.Image, fmt: str, max_pixels: int, **save):
    """(patches and grid as the library computes them, the same from an EncodedImage)."""
    data = encoded(image, fmt, **save)
    exact = preprocess_images([decode_image(data, "it")], CONFIG, max_pixels=max_pixels)
    pixels, grid, size = preprocess_encoded(
        EncodedImage.open(data, "it", 10**9), CONFIG, max_pixels=max_pixels
    )
    return exact, (pixels, grid[None], size)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_an_image_within_three_times_its_target_decodes_exactly(fmt):
    """Below REDUCING_GAP times the resized size nothing is shrunk: bit for bit as the library."""
    (exact_pixels, exact_grid), (pixels, grid, size) = exact_and_encoded(
        picture(600, 450), fmt, max_pixels=200 * 150
    )
    assert size == (600, 450)
    np.testing.assert_array_equal(grid, exact_grid)
    np.testing.assert_array_equal(pixels, exact_pixels)


def unnormalized(patches: np.ndarray) -> np.ndarray:
    """Patches back to 0-255 values, to state differences in pixel levels."""
    std = np.repeat(np.asarray(CONFIG.image_std, np.float32), 2 * 14 * 14)
    mean = np.repeat(np.asarray(CONFIG.image_mean, np.float32), 2 * 14 * 14)
    return (patches * std + mean) * 255


@pytest.mark.parametrize(
    "fmt, save, mode",
    [
        ("JPEG", {"quality": 92}, "RGB"),  # decoded at 1/2 scale (draft), then box-reduced
        ("PNG", {}, "RGB"),
        ("PNG", {}, "RGBA"),
        ("PNG", {}, "P"),
        ("PNG", {}, "L"),
        ("TIFF", {}, "CMYK"),
    ],
)
def test_a_far_larger_image_is_shrunk_while_decoding_within_the_bound(fmt, save, mode):
    """The grid is the full image's; the resized pixels differ from the exact ones by less than
    1/255 on average and 12/255 at the 99.9th percentile (measured: 0.3 and 6 on a 8192x6144
    photo with text, JPEG; README, 'Serve')."""
    image = picture(2400, 1800)
    if mode == "RGBA":
        image.putalpha(Image.linear_gradient("L").resize(image.size))
    elif mode != "RGB":
        image = image.convert(mode)
    (exact_pixels, exact_grid), (pixels, grid, size) = exact_and_encoded(
        image, fmt, max_pixels=224 * 168, **save
    )
    assert size == (2400, 1800)
    np.testing.assert_array_equal(grid, exact_grid)
    difference = np.abs(unnormalized(pixels) - unnormalized(exact_pixels))
    assert difference.mean() < 1.0 and np.percentile(difference, 99.9) < 12
    assert difference.max() > 0  # it was shrunk: this is not the exact path


def test_exif_orientation_is_applied_when_shrinking():
    image = picture(2400, 1200)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    data = encoded(image, "JPEG", quality=95, exif=exif.tobytes())
    encoded_image = EncodedImage.open(data, "it", 10**9)
    assert encoded_image.size == (2400, 1200)
    small, upright = encoded_image.decode(lambda h, w: (h // 28 // 4 * 28, w // 28 // 4 * 28))
    exact = decode_image(data, "it")
    assert upright == exact.size == (1200, 2400) and small.width < small.height
    shrunk = np.asarray(small.resize(exact.size, Image.BICUBIC), dtype=np.float32)
    assert np.abs(shrunk - np.asarray(exact, dtype=np.float32)).mean() < 8  # same picture


def test_sixteen_bit_images_scale_the_same_way_when_shrunk():
    values = np.linspace(0, 65535, 1800 * 2400).reshape(1800, 2400).astype(np.uint16)
    (exact_pixels, _), (pixels, _, _) = exact_and_encoded(
        Image.fromarray(values), "PNG", max_pixels=224 * 168
    )
    assert np.abs(unnormalized(pixels) - unnormalized(exact_pixels)).mean() < 1.0


def modes_to_convert() -> dict[str, Image.Image]:
    base = picture(400, 300)
    rgba = base.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    palette = base.convert("P")
    palette.info["transparency"] = 3
    deep = Image.fromarray(np.linspace(0, 65535, 400 * 300).reshape(300, 400).astype(np.uint16))
    return {
        "RGB": base,
        "RGBA": rgba,
        "LA": rgba.convert("LA"),
        "P": palette,
        "L": base.convert("L"),
        "1": base.convert("1"),
        "I;16": deep,
        "CMYK": base.convert("CMYK"),
    }


@pytest.mark.parametrize("mode", sorted(modes_to_convert()))
def test_band_by_band_conversion_and_reduction_equal_the_whole(mode, monkeypatch):
    """Large images are converted (and reduced) a band of rows at a time to hold less; the
    pixels are the same as converting (reducing) the whole image at once."""
    image = modes_to_convert()[mode]
    whole = image_files.to_rgb(image)
    reduced_whole = image_files._reduced(image, 3)
    monkeypatch.setattr(image_files, "STRIP_PIXELS", 400 * 7)  # bands of 7 rows (6 when reducing)
    np.testing.assert_array_equal(np.asarray(image_files.to_rgb(image)), np.asarray(whole))
    np.testing.assert_array_equal(
        np.asarray(image_files._reduced(image, 3)), np.asarray(reduced_whole)
    )
