"""`mimo-mlx generate --ground / --annotate`: boxes back on the user's own image, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_generate import write_model_folder

import mimo_mlx
from mimo_mlx.cli.main import main
from mimo_mlx.generation import loop as generation
from mimo_mlx.grounding.draw import PALETTE
from mimo_mlx.inputs.images import smart_resize


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_model_folder(tmp_path_factory.mktemp("tiny-ground"), seed=21)


@pytest.fixture
def photo(tmp_path):
    """A 1000 x 500 grey photo, resized by the tiny model's processor to a smaller grid."""
    path = tmp_path / "photo.png"
    Image.new("RGB", (1000, 500), (128, 128, 128)).save(path)
    return path


MAX_PIXELS = 28 * 28 * 64  # a small grid for the tiny model


def run(*args):
    args = ["generate", "--max-pixels", str(MAX_PIXELS), *map(str, args)]
    return CliRunner().invoke(main, args)


def report_of(result) -> dict:
    """The JSON report printed after the answer (which may hold JSON of its own)."""
    return json.loads(result.stdout[result.stdout.rindex('{\n  "coordinates"') :])


def answer_with(monkeypatch, text: str) -> None:
    """Let the real CLI, processor and model run, but have generation answer `text`."""

    def fake_stream(model, processor, prompt, inputs=None, max_tokens=0, **options):
        yield generation.GenerationResponse(
            text=text,
            token=0,
            logprobs=mx.zeros((1,)),
            from_draft=False,
            prompt_tokens=int(inputs.input_ids.shape[1]),
            prompt_tps=1.0,
            generation_tokens=1,
            generation_tps=1.0,
            peak_memory=0.0,
            time_to_first_token=0.1,
            finish_reason="stop",
        )

    monkeypatch.setattr(generation, "stream_generate", fake_stream)


def test_ground_with_a_gibberish_answer_says_no_boxes(folder, photo):
    """The tiny model's answer is random tokens: the answer is printed and the command says so."""
    result = run("--model", folder, "--image", photo, "--ground", "the red car", "-m", "6")
    assert result.exit_code == 0, result.output
    assert "no boxes or points in the answer" in result.stderr
    assert "Traceback" not in result.output


def test_annotate_with_a_gibberish_answer_writes_nothing_and_says_so(folder, photo, tmp_path):
    """As `annotate` does: no boxes, no picture, one line, exit status 1 (the answer is shown)."""
    out = tmp_path / "marked.png"
    result = run("--model", folder, "--image", photo, "-p", "Where?", "--annotate", out, "-m", "6")
    assert result.exit_code == 1 and not out.exists()
    assert result.stderr.splitlines()[-1].startswith("error: no boxes or points in the answer")
    assert result.stderr.rstrip().endswith(f"{out} not written")
    assert result.stdout.strip()  # the answer itself


def test_boxes_come_back_in_pixels_of_the_users_image(folder, photo, tmp_path, monkeypatch):
    height, width = smart_resize(500, 1000, 28, 3136, MAX_PIXELS)
    assert (width, height) == (308, 140)  # 1000x500 / sqrt(500000 / 50176), floored to 28s
    answer = (
        "<think>The car is on the left.</think>\n```json\n"
        f'[{{"bbox_2d": [0, 0, {width // 2}, {height // 2}], "label": "car"}}]\n```'
    )
    answer_with(monkeypatch, answer)
    out = tmp_path / "marked.png"
    result = run("--model", folder, "--image", photo, "--ground", "the car", "--annotate", out)
    assert result.exit_code == 0, result.output
    report = report_of(result)
    assert report["coordinates"] == "original image pixels"
    assert report["boxes"] == [{"label": "car", "bbox": [0, 0, 500, 250]}]
    assert report["image"] == {
        "width": 1000,
        "height": 500,
        "resized_width": 308,
        "resized_height": 140,
    }
    drawn = np.asarray(Image.open(out).convert("RGB"))
    assert drawn.shape == (500, 1000, 3)
    assert tuple(drawn[125, 499]) == PALETTE[0]  # the right edge (drawn inside the box)
    assert tuple(drawn[125, 520]) == (128, 128, 128)  # and nothing beyond it


def test_annotate_without_ground_draws_any_answer_with_points(folder, photo, tmp_path, monkeypatch):
    answer_with(monkeypatch, '{"action": "click", "start_point": [154, 70]}')  # the centre
    out = tmp_path / "click.jpg"
    result = run("--model", folder, "--image", photo, "--prompt", "Click OK", "--annotate", out)
    assert result.exit_code == 0, result.output
    report = report_of(result)
    assert report["actions"] == [{"action": "click", "start_point": [500, 250]}]
    assert Image.open(out).size == (1000, 500)


def test_exif_rotated_photo_maps_to_the_upright_image(folder, tmp_path, monkeypatch):
    """A phone photo stored 1000 wide, 500 tall, with EXIF 'rotate 90': the user sees 500 x 1000."""
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (1000, 500), (128, 128, 128)).save(path, exif=exif)
    height, width = smart_resize(1000, 500, 28, 3136, MAX_PIXELS)
    answer_with(monkeypatch, f'[{{"point_2d": [{width}, {height}], "label": "corner"}}]')
    result = run("--model", folder, "--image", path, "--ground", "the corner")
    report = report_of(result)
    assert report["points"] == [{"label": "corner", "point": [500, 1000]}]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image", "{photo}"], "exactly one --image"),
        (["--video", "{tmp}"], "no --video"),
    ],
)
def test_several_images_or_a_video_are_refused(folder, photo, tmp_path, extra, message):
    extra = [x.format(photo=photo, tmp=tmp_path) for x in extra]
    result = run("--model", folder, "--image", photo, *extra, "--ground", "the car")
    assert result.exit_code == 1 and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bad_annotate_paths_are_refused_before_generating(folder, photo, tmp_path):
    for out, message in (
        (tmp_path / "out.gif", "name the annotated image"),
        (tmp_path / "missing" / "out.png", "does not exist"),
        (photo, "refusing to overwrite the input image"),
    ):
        result = run("--model", folder, "--image", photo, "--prompt", "x", "--annotate", out)
        assert result.exit_code == 1 and message in result.output, result.output


def test_prompt_and_ground_are_one_or_the_other(folder, photo):
    assert "give --prompt or --ground" in run("--image", photo, "-p", "x", "--ground", "y").output
    assert "--gui goes with --ground" in run("--image", photo, "-p", "x", "--gui").output
    assert "give a --prompt" in run("--image", photo).output


def test_python_api_returns_the_same_boxes(folder, photo, monkeypatch):
    model, processor = mimo_mlx.load(folder)
    result = mimo_mlx.generate(
        model, processor, "Where?", [photo], max_tokens=2, max_pixels=MAX_PIXELS
    )
    assert result.inputs.image_sizes == (((1000, 500), (308, 140)),)
    found = generation.GenerationResult(
        '[{"bbox_2d": [0, 0, 154, 70], "label": "car"}]', "", "", [], None, result.inputs
    ).grounding
    assert [(b.x1, b.y1, b.x2, b.y2, b.label) for b in found.boxes] == [(0, 0, 500, 250, "car")]


EXAMPLES = Path(__file__).parent / "examples"


def test_annotate_maps_an_answer_onto_the_image(tmp_path):
    """`mimo-mlx annotate` on the README's example: the boxes in original pixels, and the committed
    picture drawn exactly there (the README shows what the command does)."""
    out = tmp_path / "marked.png"
    args = [
        "annotate",
        "--image",
        EXAMPLES / "street.png",
        "--answer",
        EXAMPLES / "street-answer.txt",
    ]
    result = CliRunner().invoke(main, [*map(str, args), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = report_of(result)
    assert report["image"]["resized_width"] == 1092 and report["image"]["resized_height"] == 728
    boxes = {b["label"]: b["bbox"] for b in report["boxes"]}
    assert boxes == {
        "red car": [139, 520, 560, 730],
        "sun": [1010, 70, 1170, 230],
        "tree": [760, 250, 960, 700],
    }
    for picture in (out, EXAMPLES / "grounding.png"):
        drawn = np.asarray(Image.open(picture).convert("RGB"))
        for colour, (x1, y1, x2, y2) in zip(PALETTE, boxes.values(), strict=False):
            middle = (y1 + y2) // 2
            assert tuple(drawn[middle, x1]) == colour and tuple(drawn[middle, x2 - 1]) == colour


def test_annotate_refuses_an_answer_without_boxes(tmp_path):
    answer = tmp_path / "answer.txt"
    answer.write_text("<think>hmm</think>I cannot see it.")
    args = ["annotate", "--image", str(EXAMPLES / "street.png"), "--answer", str(answer)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "no boxes or points in the answer" in result.output
