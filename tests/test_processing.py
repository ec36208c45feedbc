"""Image and video preprocessing against transformers' Qwen2VL image processor.

The reference is whatever ``AutoImageProcessor`` builds from MiMo-VL's published
preprocessor_config.json: ``Qwen2VLImageProcessorPil`` without torchvision (our test environment),
the torchvision ``Qwen2VLImageProcessor`` with it. Our pipeline runs the PIL backend's operations
in the same order, so pixel_values must agree to float32 rounding; we measure exactly 0.0 and
allow 1e-6 only so a harmless reordering of float32 ops in transformers would not fail the suite.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageOps

from mimo_mlx.errors import MimoError
from mimo_mlx.inputs.images import (
    CHECKPOINT_MAX_PIXELS,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    ImageProcessorConfig,
    load_image,
    load_processor_config,
    preprocess_images,
    smart_resize,
)
from mimo_mlx.inputs.video import (
    DEFAULT_VIDEO_MAX_PIXELS,
    DEFAULT_VIDEO_MIN_PIXELS,
    load_video,
    plan_video,
    preprocess_video,
    read_video,
    sample_frame_indices,
    video_tokens,
)

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

ATOL = 1e-6
MIMO_PREPROCESSOR_CONFIG = {  # as published with XiaomiMiMo/MiMo-VL-7B-RL
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mimo")
    (folder / "preprocessor_config.json").write_text(json.dumps(MIMO_PREPROCESSOR_CONFIG))
    return folder


@pytest.fixture(scope="module")
def reference(model_dir):
    """reference(images, min_pixels, max_pixels) -> transformers' (pixel_values, image_grid_thw)."""
    base = transformers.AutoImageProcessor.from_pretrained(str(model_dir))

    def run(images, min_pixels=DEFAULT_MIN_PIXELS, max_pixels=DEFAULT_MAX_PIXELS):
        size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        out = base(images=images, size=size, return_tensors="np")
        return np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])

    return run


def random_image(height: int, width: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4, "L": 1, "LA": 2}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)


def opened_upright(path) -> Image.Image:
    """What a transformers user hands the processor: the file, opened and EXIF-transposed."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image)


def assert_matches(ours, ref):
    (pv, grid), (ref_pv, ref_grid) = ours, ref
    assert pv.dtype == np.float32 and grid.dtype == np.int64
    np.testing.assert_array_equal(grid, ref_grid)
    assert pv.shape == ref_pv.shape
    assert np.abs(pv - ref_pv).max() <= ATOL


def test_reference_is_the_auto_processor(model_dir):
    processor = transformers.AutoImageProcessor.from_pretrained(str(model_dir))
    assert type(processor).__name__ in ("Qwen2VLImageProcessorPil", "Qwen2VLImageProcessor")


SIZES = [(28, 28), (29, 29), (131, 257), (257, 131), (40, 5000), (30, 40), (2000, 1500), (333, 777)]


@pytest.mark.parametrize("height,width", SIZES)
def test_png_sizes_match_transformers(tmp_path, reference, height, width):
    path = tmp_path / "image.png"
    random_image(height, width, seed=height * width).save(path)
    assert_matches(preprocess_images([load_image(path)]), reference([opened_upright(path)]))


@pytest.mark.parametrize("suffix", ["jpg", "webp", "gif"])
def test_formats_match_transformers(tmp_path, reference, suffix):
    path = tmp_path / f"image.{suffix}"
    random_image(131, 257, seed=1).save(path)
    assert_matches(preprocess_images([path]), reference([opened_upright(path)]))


def test_checkpoint_limit_and_several_images(tmp_path, reference):
    images = [random_image(2000, 1500, seed=2), random_image(57, 90, seed=3)]
    ours = preprocess_images(images, max_pixels=None)  # None: the checkpoint's 12.8 MP
    assert_matches(ours, reference(images, max_pixels=CHECKPOINT_MAX_PIXELS))
    assert ours[1].tolist() == [[1, 142, 108], [1, 4, 6]]


def test_config_from_model_dir_drives_preprocessing(model_dir, reference):
    config = load_processor_config(model_dir)
    assert config == ImageProcessorConfig()
    image = random_image(300, 200, seed=4)
    ours = preprocess_images([image], config, min_pixels=28 * 28 * 8, max_pixels=28 * 28 * 20)
    assert_matches(ours, reference([image], 28 * 28 * 8, 28 * 28 * 20))


def test_config_layouts(tmp_path, model_dir):
    # transformers 5 writes size = {shortest_edge, longest_edge} and no min/max_pixels
    processor = transformers.AutoImageProcessor.from_pretrained(
        str(model_dir), min_pixels=1000, max_pixels=500_000
    )
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert "max_pixels" not in saved
    config = load_processor_config(tmp_path)
    assert (config.min_pixels, config.max_pixels) == (1000, 500_000)
    assert config.rescale_factor == pytest.approx(1 / 255) and config.resample == 3
    assert load_processor_config(tmp_path / "missing") == ImageProcessorConfig()
    old = ImageProcessorConfig.from_dict({"size": {"min_pixels": 100, "max_pixels": 200}})
    assert (old.min_pixels, old.max_pixels) == (100, 200)


def test_config_errors(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(MimoError, match="not valid JSON"):
        load_processor_config(tmp_path)
    with pytest.raises(MimoError, match="patch_size"):
        ImageProcessorConfig.from_dict({"patch_size": 0})
    with pytest.raises(MimoError, match="image_std"):
        ImageProcessorConfig.from_dict({"image_std": "0.5"})
    with pytest.raises(MimoError, match="min_pixels"):
        ImageProcessorConfig.from_dict({"min_pixels": 10, "max_pixels": 5})


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref

    rng = np.random.default_rng(5)
    sizes = [tuple(s) for s in rng.integers(28, 4000, (300, 2))] + [(28, 5600), (5600, 28)]
    for height, width in sizes:
        for lo, hi in [(3136, DEFAULT_MAX_PIXELS), (3136, 12845056), (128 * 784, 256 * 784)]:
            if max(height, width) / min(height, width) > 200:
                continue
            assert smart_resize(height, width, 28, lo, hi) == ref(height, width, 28, lo, hi)
    with pytest.raises(MimoError, match="aspect ratio"):
        smart_resize(28, 5601)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    random_image(48, 64, seed=6).save(path, exif=exif.tobytes())
    image = load_image(path)
    assert image.size == (48, 64)  # (width, height): was 64 wide, now 48
    np.testing.assert_array_equal(np.asarray(image), np.asarray(opened_upright(path)))


def palette_with_transparency() -> Image.Image:
    image = random_image(90, 120, seed=7).quantize(colors=16)
    image.info["transparency"] = 3
    return image


@pytest.mark.parametrize(
    "make",
    [
        lambda: random_image(90, 120, seed=8, mode="RGBA"),
        lambda: random_image(90, 120, seed=9, mode="LA"),
        lambda: random_image(90, 120, seed=10, mode="L"),
        lambda: random_image(90, 120, seed=11, mode="CMYK"),
        lambda: random_image(90, 120, seed=12).quantize(colors=32),
        palette_with_transparency,
        lambda: random_image(90, 120, seed=13, mode="L").convert("1"),
        lambda: Image.fromarray(np.arange(90 * 120, dtype=np.uint16).reshape(90, 120) % 256),
    ],
    ids=["RGBA", "LA", "L", "CMYK", "P", "P-transparent", "1", "I;16-8bit-values"],
)
def test_modes_convert_like_transformers(tmp_path, reference, make):
    image = make()
    suffix = "jpg" if image.mode == "CMYK" else "png"
    path = tmp_path / f"image.{suffix}"
    image.save(path)
    assert_matches(preprocess_images([path]), reference([opened_upright(path)]))


def test_alpha_is_composited_on_white(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(path)
    assert np.asarray(load_image(path)).min() == 255


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    # Deliberate difference: PIL (and so transformers) clips 16-bit values to 255, a white image.
    values = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    image = load_image(path)
    expected = np.round(values / 257).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(image)[..., 0], expected)


@pytest.mark.parametrize(
    "name,make,message",
    [
        ("missing.png", None, "not found"),
        ("x.png", lambda p: p.write_text("hello, not an image"), "not a readable image"),
        ("tiny.png", lambda p: random_image(10, 10).save(p), "at least 28 pixels"),
        ("thin.png", lambda p: random_image(28, 6000).save(p), "aspect ratio"),
    ],
)
def test_bad_images_raise_mimo_error(tmp_path, name, make, message):
    path = tmp_path / name
    if make is not None:
        make(path)
    with pytest.raises(MimoError, match=message):
        load_image(path)
    with pytest.raises(MimoError, match=message):
        preprocess_images([path])


def test_runtime_imports_stay_light():
    code = (
        "import sys, mimo_mlx.inputs.images, mimo_mlx.inputs.video; "
        "print(sorted({'torch', 'transformers', 'cv2', 'av'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- video ---------------------------------------------------------------------------------------


def reference_video(reference, frames, min_pixels, max_pixels):
    """Video patches built from transformers' per-frame image patches.

    transformers' video processor needs torchvision, so we take each frame's normalized patches
    from the image processor (one image = the frame twice, layout (C, T, 14, 14) per row) and
    interleave pairs of frames along T: the video processor's own (C, T, 14, 14) row layout.
    """
    frames = list(frames) + [frames[-1]] * (len(frames) % 2)
    per_frame = []
    for frame in frames:
        pv, grid = reference([frame], min_pixels, max_pixels)
        per_frame.append(pv.reshape(len(pv), 3, 2, 14, 14)[:, :, 0])  # (N, C, 14, 14)
    pairs = [np.stack(per_frame[i : i + 2], axis=2) for i in range(0, len(frames), 2)]
    pv = np.concatenate(pairs).reshape(-1, 3 * 2 * 14 * 14)
    return pv, np.array([[len(frames) // 2, grid[0, 1], grid[0, 2]]])


def test_frame_folder_matches_transformers(tmp_path, reference):
    names = ["f1.png", "f2.png", "f3.png", "f10.png", "f20.png"]  # natural order != sorted order
    frames = [random_image(96, 130, seed=20 + i) for i in range(len(names))]
    for name, frame in zip(names, frames, strict=True):
        frame.save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("ignored")

    pixels, sample_fps = load_video(tmp_path, fps=4.0)
    assert pixels.shape[0] == 5 and sample_fps == 4.0
    pv, grid, second_per_grid_t = preprocess_video(pixels, sample_fps)
    ref = reference_video(reference, frames, DEFAULT_VIDEO_MIN_PIXELS, DEFAULT_VIDEO_MAX_PIXELS)
    assert_matches((pv, grid), ref)
    assert grid[0, 0] == 3 and second_per_grid_t == 2 / 4.0
    # the PIL frames straight into preprocess_video give the same result
    np.testing.assert_array_equal(preprocess_video(frames, 4.0)[0], pv)


def test_frame_folder_thinned_to_max_frames(tmp_path):
    for i in range(10):
        random_image(60, 60, seed=i).save(tmp_path / f"{i}.png")
    pixels, sample_fps = load_video(tmp_path, fps=2.0, max_frames=4)
    assert pixels.shape[0] == 4 and sample_fps == pytest.approx(0.8)


def test_sample_frame_indices_follow_qwen_vl_utils():
    assert sample_frame_indices(30, 10.0, 2.0).tolist() == [0, 6, 12, 17, 23, 29]
    assert len(sample_frame_indices(10, 30.0, 2.0)) == 4  # 1/3 s of video still gives 4 frames
    assert len(sample_frame_indices(3000, 30.0, 2.0, max_frames=64)) == 64
    assert len(sample_frame_indices(31, 10.0, 2.0)) == 6  # 6.2 floored to a multiple of 2
    for total in range(2, 300, 7):
        for n in range(2, total + 1, 2):
            expected = torch.linspace(0, total - 1, n).round().long().numpy()
            ours = sample_frame_indices(total, float(total), float(n), max_frames=n, min_frames=2)
            np.testing.assert_array_equal(ours, expected)
    # Shorter than one temporal patch: the frames there are (preprocessing repeats the last one).
    assert sample_frame_indices(1, 10.0).tolist() == [0]
    assert sample_frame_indices(300, 30.0, 2.0, max_frames=1).tolist() == [0]
    with pytest.raises(MimoError, match="no frames"):
        sample_frame_indices(0, 10.0)


@pytest.fixture
def video_file(tmp_path):
    cv2 = pytest.importorskip("cv2")
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for index in range(30):  # 3 s at 10 fps; frame i is a flat grey of level 8 * i
        writer.write(np.full((48, 64, 3), 8 * index, dtype=np.uint8))
    writer.release()
    return path


@pytest.mark.parametrize("decoder", ["av", "cv2"])
def test_video_file_sampling(video_file, monkeypatch, decoder):
    pytest.importorskip(decoder)
    if decoder == "cv2":
        monkeypatch.setitem(sys.modules, "av", None)  # make PyAV, if installed, look absent
    pixels, sample_fps = load_video(video_file, fps=2.0)
    assert sample_fps == pytest.approx(2.0)
    levels = pixels.reshape(len(pixels), -1).mean(axis=1)
    np.testing.assert_allclose(levels, 8 * np.array([0, 6, 12, 17, 23, 29]), atol=3)
    pv, grid, second_per_grid_t = preprocess_video(pixels, sample_fps)
    assert grid.tolist() == [[3, pixels.shape[1] // 14, pixels.shape[2] // 14]]
    assert pv.shape == (grid.prod(), 1176) and second_per_grid_t == pytest.approx(1.0)


@pytest.mark.parametrize("reported", [0, 40])
def test_video_file_with_wrong_frame_count(video_file, monkeypatch, reported):
    # Containers may not store a frame count (0) or over-report it: both recover the true 30.
    import mimo_mlx.inputs.video as video

    monkeypatch.setattr(video, "_probe", lambda path, decoder: (reported, 10.0))
    pixels, sample_fps = load_video(video_file, fps=2.0)
    levels = pixels.reshape(len(pixels), -1).mean(axis=1)
    np.testing.assert_allclose(levels, 8 * np.array([0, 6, 12, 17, 23, 29]), atol=3)
    assert sample_fps == pytest.approx(2.0)


def test_missing_decoder_says_what_to_install(video_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # None in sys.modules makes `import` fail
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(MimoError, match="pip install av"):
        load_video(video_file)


def test_video_errors(tmp_path):
    with pytest.raises(MimoError, match="not found"):
        load_video(tmp_path / "nope.mp4")
    with pytest.raises(MimoError, match="no image frames"):
        load_video(tmp_path)
    (tmp_path / "fake.avi").write_text("not a video")
    with pytest.raises(MimoError, match="fake.avi"):
        load_video(tmp_path / "fake.avi")
    with pytest.raises(MimoError, match="uint8"):
        preprocess_video(np.zeros((2, 56, 56, 3), dtype=np.float32), 2.0)


# --- a video's token budget --------------------------------------------------------------------

CONFIG = ImageProcessorConfig()
SMALL = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)  # frames of 4 to 64 tokens a pair


def test_a_video_within_its_budget_is_left_as_it_was():
    """The defaults (128 frames at 256 tokens a pair at most) fit the default budget exactly."""
    plan = plan_video(128, 2160, 3840)  # 4K, 16:9
    assert plan.notice is None and plan.size == smart_resize(2160, 3840, 28, *PIXELS_DEFAULT)
    assert plan.tokens(CONFIG) <= 16384 and plan.frames == 128
    square = plan_video(128, 1000, 1000)
    assert square.tokens(CONFIG) == 64 * 256 == 16384 and square.notice is None


PIXELS_DEFAULT = (DEFAULT_VIDEO_MIN_PIXELS, DEFAULT_VIDEO_MAX_PIXELS)


def test_frames_shrink_first_then_fewer_are_kept():
    """A 1280x720 clip, default limits and budget (16,384 tokens), worked by hand: its frames
    resize to 588x336 (21 x 12 = 252 tokens a pair of frames). 128 frames: 64 x 252 = 16,128,
    they fit. 256 frames: 128 pairs x 252 = 32,256; a pair may have 16,384 // 128 = 128 tokens,
    128 x 28 x 28 = 100,352 pixels = min_pixels: smart_resize to that gives 420x224 (15 x 8 = 120
    tokens), all 256 frames kept: 15,360. 512 frames: 64 tokens a pair is below the floor; at the
    floor's 420x224 (120 tokens) 16,384 // 120 = 136 pairs fit: 272 frames, 16,320 tokens."""
    assert plan_video(128, 720, 1280).size == (336, 588)
    assert plan_video(128, 720, 1280).notice is None
    shrunk = plan_video(256, 720, 1280)
    assert (shrunk.frames, shrunk.size) == (256, (224, 420))
    assert shrunk.notice == (
        "256 frames at 588x336 would take 32256 tokens, more than video_max_tokens (16384): "
        "frames shrunk to 420x224"
    )
    fewer = plan_video(512, 720, 1280)
    assert (fewer.frames, fewer.size, fewer.tokens(CONFIG)) == (272, (224, 420), 16320)
    assert "and 272 of the 512 frames kept, evenly spaced" in fewer.notice
    with pytest.raises(
        MimoError, match="less than one pair of frames .* 420x224 .*120 tokens"
    ) as caught:
        plan_video(4, 720, 1280, max_tokens=119)
    assert "raise video_max_tokens or lower video_min_pixels" in str(caught.value)  # no CLI flags


def test_a_plan_never_passes_its_budget_and_shrinks_before_it_drops_frames():
    rng = np.random.default_rng(0)
    for _ in range(500):
        frames = int(rng.integers(1, 400))
        height, width = (int(v) for v in rng.integers(28, 3000, 2))
        if max(height, width) / min(height, width) > 150:
            continue
        budget = int(rng.integers(1, 40000))
        usual = smart_resize(height, width, 28, *PIXELS_DEFAULT)
        floor = smart_resize(height, width, 28, DEFAULT_VIDEO_MIN_PIXELS, DEFAULT_VIDEO_MIN_PIXELS)
        try:
            plan = plan_video(frames, height, width, budget)
        except MimoError:
            assert video_tokens(2, floor, CONFIG) > budget  # not even one pair at the floor
            continue
        assert plan.tokens(CONFIG) <= budget
        assert (plan.notice is None) == (video_tokens(frames, usual, CONFIG) <= budget)
        if plan.frames < frames:  # fewer frames only at the floor's size, in whole pairs
            assert plan.size == floor and plan.frames % 2 == 0
            assert video_tokens(plan.frames + 2, floor, CONFIG) > budget


def frame_folder(folder, count: int, side: int = 112):
    frames = [random_image(side, side, seed=40 + i) for i in range(count)]
    for i, frame in enumerate(frames):
        frame.save(folder / f"{i}.png")
    return frames


def test_shrunk_frames_match_transformers_at_the_budget_s_max_pixels(tmp_path, reference):
    """12 frames of 112x112, 4 to 64 tokens a pair: as they are, 112x112 (16 tokens a pair, 96
    in all). A budget of 60 leaves 10 tokens a pair, 7,840 pixels: transformers' processor with
    that max_pixels gives the frames we give, 84x84 (9 tokens a pair, 54 in all), all 12."""
    frames = frame_folder(tmp_path, 12)
    clip = read_video(tmp_path, fps=4.0, **SMALL, max_tokens=60)
    assert clip.frames.shape == (12, 84, 84, 3) and clip.fps == 4.0
    assert clip.notice == (
        f"{tmp_path.name}: 12 frames at 112x112 would take 96 tokens, more than "
        "video_max_tokens (60): frames shrunk to 84x84"
    )
    pv, grid, second = preprocess_video(clip.frames, clip.fps, size=clip.frames.shape[1:3])
    assert_matches((pv, grid), reference_video(reference, frames, SMALL["min_pixels"], 10 * 784))
    assert grid.tolist() == [[6, 6, 6]] and second == 0.5


def test_past_the_floor_fewer_frames_evenly_spaced_match_transformers(tmp_path, reference):
    """The same 12 frames with a budget of 20: 20 // 6 = 3 tokens a pair is below the floor
    (min_pixels: 56x56, 4 tokens), so the frames take the floor's size and 20 // 4 = 5 pairs
    are kept: the 10 frames torch.linspace(0, 11, 10).round() picks, at 4 x 10 / 12 a second."""
    frames = frame_folder(tmp_path, 12)
    with pytest.warns(UserWarning, match="56x56 .* and 10 of the 12 frames kept, evenly spaced"):
        pixels, fps = load_video(tmp_path, fps=4.0, **SMALL, max_tokens=20)
    keep = torch.linspace(0, 11, 10).round().long().tolist()
    assert pixels.shape == (10, 56, 56, 3) and fps == pytest.approx(4.0 * 10 / 12)
    pv, grid, second = preprocess_video(pixels, fps, size=pixels.shape[1:3])
    floor = SMALL["min_pixels"]
    assert_matches((pv, grid), reference_video(reference, [frames[i] for i in keep], floor, floor))
    assert grid.tolist() == [[5, 4, 4]] and second == pytest.approx(2 / fps)


def test_a_video_file_past_its_budget_samples_fewer_frames_evenly(video_file):
    """30 grey frames at 10 fps, sampled at 2 fps: 6 frames (levels 8 x [0 6 12 17 23 29]); a
    budget of 2 pairs at the floor keeps 4, spread over the whole clip as qwen-vl-utils spreads
    any frame count."""
    pytest.importorskip("cv2")
    clip = read_video(video_file, fps=2.0, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 4,
                      max_tokens=8)  # fmt: skip
    assert clip.frames.shape[0] == 4 and clip.fps == pytest.approx(4 / 3)
    levels = clip.frames.reshape(4, -1).mean(axis=1)
    np.testing.assert_allclose(levels, 8 * sample_frame_indices(30, 10.0, 2.0, 4), atol=3)
    assert sample_frame_indices(30, 10.0, 2.0, 4).tolist() == [0, 10, 19, 29]
    assert "4 of the 6 frames kept" in clip.notice and clip.notice.startswith("clip.avi: ")


def test_the_processor_says_what_the_budget_changed_once(tmp_path):
    from tiny_tokenizer import build_tiny_tokenizer

    from mimo_mlx.inputs.processor import Processor

    folder = build_tiny_tokenizer(tmp_path / "model")
    (folder / "preprocessor_config.json").write_text(json.dumps(MIMO_PREPROCESSOR_CONFIG))
    processor = Processor.from_folder(folder)
    clip = tmp_path / "clip"
    clip.mkdir()
    frame_folder(clip, 12)
    options = dict(video_min_pixels=SMALL["min_pixels"], video_max_pixels=SMALL["max_pixels"])
    plain = processor.prepare("What happens?", videos=[clip], **options)
    assert plain.notices == () and plain.video_grid_thw.tolist() == [[6, 8, 8]]
    fitted = processor.prepare("What happens?", videos=[clip], video_max_tokens=20, **options)
    assert fitted.video_grid_thw.tolist() == [[5, 4, 4]] and fitted.vision_tokens == 20
    assert len(fitted.notices) == 1 and "10 of the 12 frames kept" in fitted.notices[0]
    video = fitted.media[0]  # prepared once: a later turn carrying it says nothing again
    history = [{"role": "user", "content": [{"type": "video", "video": video}]}]
    assert processor.prepare_messages(history, video_max_tokens=20, **options).notices == ()
    with pytest.raises(MimoError, match="video_max_tokens must be an integer >= 1"):
        processor.prepare("?", videos=[clip], video_max_tokens=0)


# --- what a user can get wrong (issue 8) ---------------------------------------------------------


def test_a_folder_given_as_an_image_says_it_is_a_folder(tmp_path):
    with pytest.raises(MimoError, match="is a folder, not an image"):
        load_image(tmp_path)


def test_a_string_is_one_image_not_letters(tmp_path, model_dir):
    from mimo_mlx.inputs.processor import _as_list

    path = tmp_path / "photo.png"
    random_image(60, 80).save(path)
    assert _as_list(str(path), "images") == [str(path)]
    assert _as_list(path, "images") == [path]
    with pytest.raises(MimoError, match="images must be a path"):
        _as_list(5, "images")


def test_images_beyond_pils_bomb_limit_load_without_a_warning(tmp_path, monkeypatch):
    """PIL refuses images above 2 x MAX_IMAGE_PIXELS (179 MP) and warns above it, but phone cameras
    reach 200 MP: with PIL's limit lowered to stand for that, a 60x60 image plays the 200 MP photo.
    """
    import warnings

    path = tmp_path / "big.png"
    random_image(60, 60).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL alone: DecompressionBombError
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        assert load_image(path).size == (60, 60)
    assert Image.MAX_IMAGE_PIXELS == 100  # put back as it was


def test_images_beyond_our_limit_are_refused_with_our_message(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    random_image(60, 60).save(path)
    monkeypatch.setattr("mimo_mlx.inputs.image_files.MAX_IMAGE_PIXELS", 3000)
    with pytest.raises(MimoError, match="60x60 pixels .* above the 0 MP mimo-mlx decodes"):
        load_image(path)


def test_a_one_frame_video_is_padded_like_an_image(tmp_path, reference):
    """transformers pads a clip to the temporal patch size by repeating the last frame, exactly as
    its image processor turns one image into two equal frames."""
    frame = random_image(96, 130, seed=3)
    frame.save(tmp_path / "only.png")
    frames, fps = load_video(tmp_path, fps=2.0)
    pv, grid, _ = preprocess_video(frames, fps)
    ref = reference([frame], DEFAULT_VIDEO_MIN_PIXELS, DEFAULT_VIDEO_MAX_PIXELS)
    assert_matches((pv, grid), ref)


def test_max_frames_one_keeps_one_frame(video_file):
    pytest.importorskip("cv2")
    frames, _ = load_video(video_file, fps=2.0, max_frames=1)
    pv, grid, _ = preprocess_video(frames, 2.0)
    assert frames.shape[0] == 1 and grid[0, 0] == 1


def test_an_image_given_as_a_video_points_to_images(tmp_path):
    path = tmp_path / "photo.jpg"
    random_image(60, 80).save(path)
    with pytest.raises(MimoError, match="is an image, not a video: give it as an image"):
        load_video(path)


def test_decoder_noise_stays_off_the_terminal(tmp_path, video_file):
    """A truncated MP4 makes ffmpeg print 'moov atom not found' on stderr; only our line remains."""
    pytest.importorskip("cv2")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 4000)
    code = (
        "import sys\n"
        "from mimo_mlx.inputs.video import load_video\n"
        "from mimo_mlx.errors import MimoError\n"
        "try:\n    load_video(sys.argv[1])\n"
        "except MimoError as err:\n    print(err)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(broken)], capture_output=True, text=True)
    assert done.returncode == 0 and "broken.mp4" in done.stdout
    assert done.stderr == "", done.stderr
