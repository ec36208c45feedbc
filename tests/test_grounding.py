"""Grounding answers: parsing every format MiMo-VL writes, and mapping back to the user's image."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mimo_mlx.errors import MimoError
from mimo_mlx.grounding.parse import Action, Box, ImageGeometry, ParseResult, Point, parse_grounding
from mimo_mlx.grounding.report import (
    geometry_of,
    grounding_prompt,
    to_json,
    to_original,
    to_resized,
)
from mimo_mlx.inputs.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    ImageProcessorConfig,
    load_image,
    preprocess_images,
    smart_resize,
)

# MiMo-VL-7B-RL's answer in Xiaomi's grounding example (examples/grounding.ipynb), abridged.
XIAOMI_ANSWER = """<think>
</think>

```json
[
\t{"bbox_2d": [222, 253, 348, 535], "label": "Poodle"},
\t{"bbox_2d": [390, 103, 440, 167], "label": "Poodle"},
\t{"bbox_2d": [289, 102, 345, 164], "label": "Poodle"}
]
```
"""


def boxes(answer: str) -> list[tuple]:
    return [(b.x1, b.y1, b.x2, b.y2, b.label) for b in parse_grounding(answer).boxes]


# ---------------------------------------------------------------- JSON answers


def test_xiaomi_example_answer():
    result = parse_grounding(XIAOMI_ANSWER)
    assert boxes(XIAOMI_ANSWER) == [
        (222, 253, 348, 535, "Poodle"),
        (390, 103, 440, 167, "Poodle"),
        (289, 102, 345, 164, "Poodle"),
    ]
    assert result.points == () and result.actions == () and result.skipped == ()
    assert result.geometry is None


@pytest.mark.parametrize(
    "answer",
    [
        '{"bbox_2d": [1, 2, 3, 4], "label": "cat"}',
        '[{"bbox_2d": [1, 2, 3, 4], "label": "cat"}]',
        '```json\n{"bbox_2d": [1, 2, 3, 4], "label": "cat"}\n```',
        'The cat is here: ```\n[{"bbox_2d": [1, 2, 3, 4], "label": "cat"}]\n``` as asked.',
        '<think>the cat [0, 0, 9, 9]?</think>\n[{"bbox_2d": [1, 2, 3, 4], "label": "cat"}]',
        '[{"bbox_2d": ["1", "2", " 3 ", "4.0"], "label": "cat"}]',
        '[{"bbox_2d": "[1, 2, 3, 4]", "label": "cat"}]',
        '[{"bbox_2d": [[1, 2], [3, 4]], "label": "cat"}]',
        '[{"bbox_2d": [3, 4, 1, 2], "label": "cat"}]',  # corners swapped: normalized
        '[{"bbox_2d": [1, 4, 3, 2], "label": " cat "}]',
        "[{'bbox_2d': [1, 2, 3, 4], 'label': 'cat'},]",  # Python quotes, trailing comma
    ],
)
def test_one_box_in_every_wrapping(answer):
    assert boxes(answer) == [(1, 2, 3, 4, "cat")]
    assert parse_grounding(answer).skipped == ()


def test_floats_are_kept():
    assert boxes('[{"bbox_2d": [1.5, 2.25, 30.75, 4e2]}]') == [(1.5, 2.25, 30.75, 400.0, "")]


def test_several_fenced_blocks_and_objects_keep_their_order():
    answer = (
        'First:\n```json\n[{"bbox_2d": [1, 1, 2, 2], "label": "a"}, '
        '{"point_2d": [5, 6], "label": "b"}]\n```\nThen:\n```json\n'
        '{"bbox_2d": [3, 3, 4, 4], "label": "c"}\n```\n'
        '{"point_2d": [7, 8], "label": "d"}'
    )
    result = parse_grounding(answer)
    assert [b.label for b in result.boxes] == ["a", "c"]
    assert result.points == (Point(5, 6, "b"), Point(7, 8, "d"))


def test_think_blocks_are_dropped_wherever_they_are():
    answer = (
        '<think>draft [{"bbox_2d": [9, 9, 9, 9]}]</think>\n'
        '[{"bbox_2d": [1, 2, 3, 4], "label": "kept"}]\n'
        '<think>second thoughts {"point_2d": [9, 9]}</think>'
    )
    assert boxes(answer) == [(1, 2, 3, 4, "kept")]
    assert parse_grounding(answer).points == ()


def test_prompt_opened_thinking_leaves_a_lone_closing_tag():
    answer = 'reasoning [{"bbox_2d": [9, 9, 9, 9]}]\n</think>\n{"point_2d": [3, 4], "label": "p"}'
    result = parse_grounding(answer)
    assert result.boxes == () and result.points == (Point(3, 4, "p"),)


def test_unfinished_reasoning_is_ignored_and_said():
    result = parse_grounding('<think>maybe [{"bbox_2d": [1, 2, 3, 4]}] or')
    assert result.boxes == ()
    assert result.skipped and "<think>" in result.skipped[0]


def test_point_2d_and_text_content_labels():
    answer = '[{"point_2d": [10, 20], "label": "nose"}, {"bbox_2d": [1, 2, 3, 4], "text_content": "EXIT"}]'
    result = parse_grounding(answer)
    assert result.points == (Point(10, 20, "nose"),)
    assert result.boxes == (Box(1, 2, 3, 4, "EXIT"),)


def test_results_wrapped_in_another_object_are_found():
    answer = '{"objects": [{"bbox_2d": [1, 2, 3, 4], "label": "a"}], "count": 1}'
    assert boxes(answer) == [(1, 2, 3, 4, "a")]


@pytest.mark.parametrize(
    "answer, expected_boxes, expected_points",
    [
        (  # a detection prompt from a public MiMo-VL integration: bbox, under "detections"
            '```json\n{"detections": [{"bbox": [10, 20, 30, 40], "label": "cat"}, '
            '{"bbox_2d": [1, 2, 3, 4], "label": "dog"}]}\n```',
            [(10, 20, 30, 40, "cat"), (1, 2, 3, 4, "dog")],
            [],
        ),
        (  # its OCR prompt: the text is the box's label
            '{"text_detections": [{"bbox": [5, 6, 50, 16], "text": "EXIT", '
            '"text_type": "button"}, {"bbox": [0, 0, 9, 9], "text": "出口"}]}',
            [(5, 6, 50, 16, "EXIT"), (0, 0, 9, 9, "出口")],
            [],
        ),
        (  # its keypoint prompt
            '{"keypoints": [{"point_2d": [7, 8], "label": "nose"}]}',
            [],
            [(7, 8, "nose")],
        ),
        (  # any key, any depth
            '{"page": {"regions": [{"items": [{"bbox": [1, 1, 2, 2], "label": "x"}]}]}}',
            [(1, 1, 2, 2, "x")],
            [],
        ),
        (  # both keys: bbox_2d is the one read
            '[{"bbox_2d": [1, 2, 3, 4], "bbox": [9, 9, 9, 9], "label": "a"}]',
            [(1, 2, 3, 4, "a")],
            [],
        ),
    ],
)
def test_shapes_people_prompt_for(answer, expected_boxes, expected_points):
    result = parse_grounding(answer)
    assert [(b.x1, b.y1, b.x2, b.y2, b.label) for b in result.boxes] == expected_boxes
    assert [(p.x, p.y, p.label) for p in result.points] == expected_points
    assert result.skipped == ()


def test_a_bad_bbox_is_said_by_its_own_name():
    result = parse_grounding('{"detections": [{"bbox": [1, 2], "label": "x"}]}')
    assert result.boxes == () and any("bbox should be 4 numbers" in n for n in result.skipped)


# ---------------------------------------------------------------- GUI actions


def test_click_and_drag_actions_carry_their_points():
    answer = (
        '```json\n[{"action": "click", "start_point": [100, 200]}, '
        '{"action": "drag", "start_point": ["10", 20.5], "end_point": [30, 40]}]\n```'
    )
    click, drag = parse_grounding(answer).actions
    assert click == Action("click", Point(100, 200, "click"))
    assert drag.start == Point(10, 20.5, "drag") and drag.end == Point(30, 40, "drag")
    assert parse_grounding(answer).points == ()  # action points live on their actions


@pytest.mark.parametrize(
    "answer, label, arguments",
    [
        ('{"action": "input", "text": "hello"}', 'input "hello"', (("text", "hello"),)),
        ('{"action": "press", "keys": ["ctrl", "c"]}', "press ctrl+c", (("keys", ["ctrl", "c"]),)),
        ('{"action": "scroll", "direction": "down"}', "scroll down", (("direction", "down"),)),
        ('{"action": "open", "app": "Maps"}', "open Maps", (("app", "Maps"),)),
        (
            '{"action": "finished", "status": "success"}',
            "finished success",
            (("status", "success"),),
        ),
        ('{"action": "wait"}', "wait", ()),
        ('{"action": "appswitch"}', "appswitch", ()),
    ],
)
def test_actions_without_points_keep_their_arguments(answer, label, arguments):
    (action,) = parse_grounding(answer).actions
    assert action.start is None and action.end is None
    assert action.label == label and action.arguments == arguments


def test_every_mimo_gui_action_name_is_read():
    names = "click scroll drag input press longpress finished wait open appswitch hover select"
    answer = json.dumps([{"action": n, "start_point": [1, 2]} for n in names.split()])
    assert [a.name for a in parse_grounding(answer).actions] == names.split()


def test_action_nested_under_action_name():
    answer = '{"action": {"action_name": "longpress", "start_point": [5, 6]}}'
    assert parse_grounding(answer).actions == (Action("longpress", Point(5, 6, "longpress")),)


# ---------------------------------------------------------------- Qwen box text


def test_box_start_text_with_and_without_reference():
    answer = (
        "<|object_ref_start|>the red car<|object_ref_end|><|box_start|>(10,20),(30,40)<|box_end|>"
        "<|box_start|>(50, 60), (70, 80)<|box_end|> and elsewhere "
        "<|box_start|>(9,8),(1,2)<|box_end|>"
    )
    assert boxes(answer) == [
        (10, 20, 30, 40, "the red car"),
        (50, 60, 70, 80, "the red car"),  # several boxes may follow one reference
        (1, 2, 9, 8, ""),
    ]


def test_point_start_text_and_single_point_boxes():
    answer = (
        "click(start_box='<|box_start|>(11,22)<|box_end|>') then "
        "<|object_ref_start|>OK<|object_ref_end|> <|point_start|>(33,44)<|point_end|>"
    )
    assert parse_grounding(answer).points == (Point(11, 22, ""), Point(33, 44, "OK"))


def test_unfinished_box_text_is_reported():
    result = parse_grounding("<|object_ref_start|>car<|object_ref_end|><|box_start|>(10,20),(3")
    assert result.boxes == () and any("box_start" in note for note in result.skipped)


# ---------------------------------------------------------------- broken answers


def test_truncated_json_keeps_complete_objects_and_names_the_rest():
    answer = (
        '```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6, 7, 8], '
        '"label": "b"}, {"bbox_2d": [9, 10, 1'
    )
    result = parse_grounding(answer)
    assert [b.label for b in result.boxes] == ["a", "b"]
    assert len(result.skipped) == 1
    assert "cut off" in result.skipped[0] and '{"bbox_2d": [9, 10, 1' in result.skipped[0]


def test_a_broken_object_costs_only_itself():
    answer = (
        '[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6, 7, 8], "label": "b"], '
        '{"bbox_2d" [9, 9, 9, 9]}, {"bbox_2d": [1, 1, 2, 2], "label": "c"}]'
    )
    result = parse_grounding(answer)
    assert [b.label for b in result.boxes] == ["a", "c"]
    assert len(result.skipped) == 2
    assert '"label": "b"' in result.skipped[0] and '{"bbox_2d" [9, 9, 9, 9]}' in result.skipped[1]


@pytest.mark.parametrize(
    "answer, complaint",
    [
        ('{"bbox_2d": [1, 2, 3], "label": "x"}', "bbox_2d should be 4 numbers"),
        ('{"bbox_2d": [1, 2, NaN, 4]}', "bbox_2d should be 4 numbers"),
        ('{"bbox_2d": [1, 2, true, 4]}', "bbox_2d should be 4 numbers"),
        ('{"point_2d": [1, Infinity]}', "point_2d should be 2 numbers"),
        ('{"point_2d": "left"}', "point_2d should be 2 numbers"),
        ('{"action": "click", "start_point": [1]}', "start_point should be 2 numbers"),
        ('{"label": "cat", "score": 0.9}', "no bbox_2d, bbox, point_2d or action"),
    ],
)
def test_unusable_objects_are_said_not_silently_dropped(answer, complaint):
    result = parse_grounding(answer)
    assert result.boxes == () and result.points == ()
    assert any(complaint in note for note in result.skipped), result.skipped


@pytest.mark.parametrize(
    "answer",
    ["", "   ", "I could not find a cat.", "Use {label_name} or [x] here.", "}{][", "```json\n```"],
)
def test_answers_without_grounding_give_an_empty_result(answer):
    assert parse_grounding(answer) == ParseResult()


def test_non_text_is_reported_not_raised():
    result = parse_grounding(None)  # type: ignore[arg-type]
    assert result.boxes == () and "NoneType" in result.skipped[0]


def test_fuzzed_answers_never_raise():
    rng = random.Random(12)
    pieces = list("{}[](),:.\"'\\-+0123456789eE \n\tabxyz_") + [
        '"bbox_2d"',
        '"point_2d"',
        '"action"',
        '"start_point"',
        '"end_point"',
        '"label"',
        "<think>",
        "</think>",
        "<|box_start|>",
        "<|box_end|>",
        "<|object_ref_start|>",
        "<|object_ref_end|>",
        "<|point_start|>",
        "```json",
        "```",
        "NaN",
        "1e999",
        "true",
        "null",
    ]
    for _ in range(3000):
        answer = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 60)))
        result = parse_grounding(answer)
        assert all(b.x1 <= b.x2 and b.y1 <= b.y2 for b in result.boxes)
        values = [v for b in result.boxes for v in (b.x1, b.y1, b.x2, b.y2)]
        assert all(math.isfinite(v) for v in values)


def test_every_truncation_finds_only_real_items():
    answer = (
        '<think>hm</think>```json\n[{"bbox_2d": [222, 253, 348, 535], "label": "Poodle"}, '
        '{"action": "drag", "start_point": [1, 2], "end_point": [3, 4]}, {"point_2d": ["5", 6.5]}]'
        "\n```\n<|object_ref_start|>a<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>"
    )
    real_boxes = {(222, 253, 348, 535), (1, 2, 3, 4)}
    for end in range(len(answer) + 1):
        result = parse_grounding(answer[:end])
        assert {(b.x1, b.y1, b.x2, b.y2) for b in result.boxes} <= real_boxes
        assert set(result.points) <= {Point(5, 6.5)}
    assert len(parse_grounding(answer).boxes) == 2


@pytest.mark.parametrize(
    "answer",
    [
        "[" * 20000 + "]" * 20000,
        '{"a":' * 5000 + "1" + "}" * 5000,
        "['" * 10000 + "]" * 10000,
        '"' * 50000,
        "<|box_start|>" * 10000,
        "<think>" * 20000,
        "<|object_ref_start|>" * 20000,
        '[{"bbox_2d": [' + "9" * 5000 + ", 1, 2, 3]}]",
    ],
)
def test_pathological_answers_are_quick(answer):
    # No timing here: a quadratic scan of these would take this one test from milliseconds to minutes.
    parse_grounding(answer)


def test_grounding_modules_do_not_import_mlx():
    # Load the modules without the package __init__ (which loads the model code and mlx).
    package = Path(__file__).resolve().parents[1] / "mimo_mlx"
    script = f"""
import sys, types
package = types.ModuleType("mimo_mlx")
package.__path__ = [{str(package)!r}]
sys.modules["mimo_mlx"] = package
import mimo_mlx.grounding.parse, mimo_mlx.grounding.report, mimo_mlx.grounding.draw
loaded = sorted(m for m in sys.modules if m == "mlx" or m.startswith("mlx."))
print(",".join(loaded))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


# ---------------------------------------------------------------- geometry


def test_mapping_scales_each_axis_and_clips():
    geometry = ImageGeometry(original_size=(1000, 500), resized_size=(504, 252))
    assert geometry.scale == (1000 / 504, 500 / 252)
    assert geometry.to_original(252, 126) == (500, 250)
    assert geometry.to_original(-5, 300) == (0, 500)  # outside the image: clipped to it
    mapped = to_original(ParseResult(boxes=(Box(-10, 0, 600, 126, "x"),)), geometry)
    assert mapped.boxes == (Box(0, 0, 1000, 250, "x"),) and mapped.geometry == geometry


def test_pixels_not_the_qwen2_grid():
    # Qwen2-VL's 0-1000 grid would put this box at the image's far corner; MiMo's pixels do not.
    geometry = ImageGeometry(original_size=(2000, 1000), resized_size=(1008, 504))
    (box,) = to_original(parse_grounding('{"bbox_2d": [0, 0, 504, 252]}'), geometry).boxes
    assert (box.x2, box.y2) == (1000, 500)


def test_mapping_twice_is_refused():
    geometry = ImageGeometry((100, 100), (112, 112))
    mapped = to_original(ParseResult(), geometry)
    with pytest.raises(ValueError):
        to_original(mapped, geometry)
    with pytest.raises(ValueError):
        to_resized(ParseResult())


@pytest.mark.parametrize("bad", [(0, 10), (10,), (10.5, 10), (-1, 5)])
def test_geometry_rejects_impossible_sizes(bad):
    with pytest.raises(ValueError):
        ImageGeometry(bad, (28, 28))


def random_geometries(count: int, seed: int):
    rng = random.Random(seed)
    limits = [
        (None, DEFAULT_MAX_PIXELS),
        (DEFAULT_MIN_PIXELS, 256 * 28 * 28),
        (128 * 28 * 28, None),
    ]
    config = ImageProcessorConfig()
    for _ in range(count):
        width = rng.randint(28, 5000)
        height = min(max(28, round(width / rng.uniform(0.1, 10))), 200 * width, 20000)
        lo, hi = rng.choice(limits)
        lo, hi = lo or config.min_pixels, hi or config.max_pixels
        resized_h, resized_w = smart_resize(height, width, 28, lo, hi)
        yield ImageGeometry((width, height), (resized_w, resized_h))


def test_points_round_trip_exactly():
    rng = random.Random(3)
    for geometry in random_geometries(300, seed=1):
        width, height = geometry.original_size
        for _ in range(5):
            x, y = rng.uniform(0, width), rng.uniform(0, height)
            back = geometry.to_original(*geometry.to_resized(x, y))
            assert back == pytest.approx((x, y), rel=1e-12, abs=1e-9)


def test_boxes_round_trip_within_one_resized_pixel():
    rng = random.Random(4)
    for geometry in random_geometries(300, seed=2):
        width, height = geometry.original_size
        x1, x2 = sorted(rng.randint(0, width) for _ in range(2))
        y1, y2 = sorted(rng.randint(0, height) for _ in range(2))
        original = ParseResult(boxes=(Box(x1, y1, x2, y2, "b"),), geometry=geometry)
        model = to_resized(original).boxes[0]  # what the model would see ...
        written = [round(v) for v in (model.x1, model.y1, model.x2, model.y2)]
        answer = json.dumps({"bbox_2d": written})  # ... and would write, in whole pixels
        back = to_original(parse_grounding(answer), geometry).boxes[0]
        scale_x, scale_y = geometry.scale
        got, want = (back.x1, back.y1, back.x2, back.y2), (x1, y1, x2, y2)
        for g, w, scale in zip(got, want, (scale_x, scale_y) * 2, strict=True):
            assert abs(g - w) <= scale / 2 + 1e-9


@pytest.mark.parametrize(
    "size, min_pixels, max_pixels",
    [
        ((640, 480), None, DEFAULT_MAX_PIXELS),
        ((28, 700), None, DEFAULT_MAX_PIXELS),
        ((60, 40), None, DEFAULT_MAX_PIXELS),
        ((1000, 600), None, 64 * 28 * 28),
        ((300, 200), 512 * 28 * 28, DEFAULT_MAX_PIXELS),
        ((777, 333), None, None),
    ],
)
def test_geometry_matches_what_preprocessing_does(tmp_path, size, min_pixels, max_pixels):
    path = tmp_path / "image.png"
    Image.new("RGB", size, (10, 20, 30)).save(path)
    geometry = geometry_of(path, min_pixels, max_pixels)
    _, grid = preprocess_images([path], min_pixels=min_pixels, max_pixels=max_pixels)
    assert geometry == ImageGeometry.from_grid(size, grid[0])
    assert geometry_of(Image.open(path), min_pixels, max_pixels) == geometry


def test_geometry_uses_the_models_preprocessor_config():
    config = ImageProcessorConfig(min_pixels=56 * 56, max_pixels=100 * 28 * 28)
    geometry = geometry_of(Image.new("RGB", (2000, 1000)), max_pixels=None, config=config)
    assert geometry.resized_size[0] * geometry.resized_size[1] <= 100 * 28 * 28


def test_geometry_errors_are_user_errors(tmp_path):
    with pytest.raises(MimoError, match="not found"):
        geometry_of(tmp_path / "missing.png")
    with pytest.raises(MimoError, match="at least 28"):
        geometry_of(Image.new("RGB", (20, 100)))
    with pytest.raises(MimoError):
        geometry_of(42)  # type: ignore[arg-type]


UPRIGHT_SWAPS = {1: False, 2: False, 3: False, 4: False, 5: True, 6: True, 7: True, 8: True}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_geometry_of_a_rotated_photo_is_its_upright_size(tmp_path, orientation):
    path = tmp_path / f"photo{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", (120, 80), (200, 100, 50)).save(path, exif=exif)
    geometry = geometry_of(path)
    expected = (80, 120) if UPRIGHT_SWAPS[orientation] else (120, 80)
    assert geometry.original_size == expected == load_image(path).size
    resized_h, resized_w = smart_resize(expected[1], expected[0], 28, DEFAULT_MIN_PIXELS)
    assert geometry.resized_size == (resized_w, resized_h)


# ---------------------------------------------------------------- prompt and report


def test_prompt_follows_xiaomi_evaluation_wording():
    prompt = grounding_prompt("  the  red car ")
    assert prompt == (
        'Based on the description: "the red car", locate all regions matching the description. '
        'Output a JSON in the format [{"bbox_2d": [...], "label": "{the_whole_description}"}, ...].'
    )
    gui = grounding_prompt("open {settings}", gui=True)
    assert gui.startswith('Locate UI components that match the command: "open {settings}".')
    assert '"bbox_2d"' in gui


def test_prompt_needs_a_query():
    with pytest.raises(MimoError, match="something to look for"):
        grounding_prompt(" \n")


def test_json_report_in_original_pixels():
    geometry = ImageGeometry(original_size=(1000, 500), resized_size=(504, 252))
    answer = (
        '[{"bbox_2d": [252, 126, 504, 252], "label": "猫"}, {"point_2d": [100.4, 50], "label": "p"},'
        ' {"action": "drag", "start_point": [0, 0], "end_point": [504, 300], "text": "x"}]'
    )
    report = json.loads(to_json(to_original(parse_grounding(answer), geometry)))
    assert report["coordinates"] == "original image pixels"
    assert report["image"] == {
        "width": 1000,
        "height": 500,
        "resized_width": 504,
        "resized_height": 252,
    }
    assert report["boxes"] == [{"label": "猫", "bbox": [500, 250, 1000, 500]}]
    assert report["points"] == [{"label": "p", "point": [199, 99]}]
    assert report["actions"] == [
        {"action": "drag", "start_point": [0, 0], "end_point": [1000, 500], "text": "x"}
    ]
    assert report["skipped"] == []
    assert "猫" in to_json(to_original(parse_grounding(answer), geometry))  # not \\u-escaped


def test_json_report_of_model_coordinates():
    report = json.loads(to_json(parse_grounding('{"bbox_2d": [1, 2.5, 3, 4]} {"point_2d": [1]}')))
    assert report["coordinates"] == "resized image pixels" and report["image"] is None
    assert report["boxes"] == [{"label": "", "bbox": [1, 2.5, 3, 4]}]
    assert len(report["skipped"]) == 1
