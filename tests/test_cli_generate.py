"""`mimo-mlx generate` as a user runs it: streamed text, a stats line, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_generate import write_model_folder

from mimo_mlx.cli.main import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_model_folder(tmp_path_factory.mktemp("tiny-cli"), seed=21)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(path)
    return path


def run(*args: str):
    return CliRunner().invoke(main, ["generate", *map(str, args)])


def test_streams_text_and_ends_with_a_stats_line(folder, photo):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mimo_mlx",
            "generate",
            "--model",
            str(folder),
            "--image",
            str(photo),
            "--prompt",
            "What is this?",
            "--max-tokens",
            "8",
            "--temp",
            "0",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    stats = result.stderr.strip().splitlines()[-1]
    assert stats.startswith("prompt: ") and "tok/s" in stats and "time to first token" in stats
    assert "peak memory" in stats and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.png", "not found"),
        (
            lambda d: (d / "notes.png").write_text("hello") and d / "notes.png",
            "not a readable image",
        ),
        (
            lambda d: Image.new("RGB", (10, 10)).save(d / "tiny.png") or d / "tiny.png",
            "must be at least 28 pixels",
        ),
        (
            lambda d: Image.new("RGB", (28, 6000)).save(d / "thin.png") or d / "thin.png",
            "aspect ratio",
        ),
    ],
    ids=["missing", "not-an-image", "too-small", "too-thin"],
)
def test_bad_images_are_one_line_errors(folder, tmp_path, make, message):
    result = run("--model", folder, "--image", make(tmp_path), "--prompt", "x")
    assert result.exit_code == 1
    assert message in result.output.lower()
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_prompt_longer_than_the_context(folder, tmp_path):
    result = run("--model", folder, "--prompt", "word " * 5000, "--max-tokens", "1")
    assert result.exit_code == 1 and "the model's context is 4096" in result.output


def test_a_folder_that_is_not_a_model(tmp_path):
    result = run("--model", tmp_path, "--prompt", "x")
    assert result.exit_code == 1 and "has no config.json" in result.output


@pytest.mark.parametrize("name", ["./typo", "~/no-such-model-here", "/no/such/folder"])
def test_a_missing_folder_is_not_taken_for_a_hub_id(name):
    result = run("--model", name, "--prompt", "x")
    assert result.exit_code == 1 and "model folder not found" in result.output
    assert "convert" not in result.output


def test_an_existing_parent_makes_a_path(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    result = run(
        "--model", "models/mimo", "--prompt", "x"
    )  # could be a repo id, but models/ exists
    assert result.exit_code == 1 and "model folder not found: models/mimo" in result.output


def test_neither_folder_nor_repo_id():
    result = run("--model", "not a repo", "--prompt", "x")
    assert (
        result.exit_code == 1
        and "neither a model folder nor a Hugging Face repo id" in result.output
    )


def test_help_explains_the_defaults():
    result = CliRunner().invoke(main, ["generate", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())  # click wraps lines
    for words in ("XiaomiMiMo/MiMo-VL-7B-RL-2508", "--max-pixels", "16 GB MacBook", "--no-think"):
        assert words in text


def test_a_hub_id_is_converted_once_then_reused(tmp_path):
    """The first-run path: a repo id (here from a pre-populated offline HF cache) is converted to
    4-bit into $MIMO_MLX_HOME, saying so, and the next run loads the conversion directly."""
    from convert_helpers import make_source
    from test_convert_hub import REPO, add_snapshot, folder_files

    cache = tmp_path / "hf" / "hub"
    add_snapshot(cache, REPO, "c" * 40, folder_files(make_source(tmp_path / "src", seed=3)))
    env = dict(
        os.environ,
        HF_HOME=str(cache.parent),
        HF_HUB_CACHE=str(cache),
        HF_HUB_OFFLINE="1",
        MIMO_MLX_HOME=str(tmp_path / "home"),
    )
    command = [sys.executable, "-m", "mimo_mlx", "generate", "--model", REPO, "-p", "Hi", "-m", "3"]
    first = subprocess.run(command, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert f"{REPO} has not been converted yet" in first.stderr
    converted = tmp_path / "home" / "models" / "tiny-org--mimo-tiny-4bit"
    assert json.loads((converted / "config.json").read_text())["quantization"]["bits"] == 4
    second = subprocess.run(command, env=env, capture_output=True, text=True)
    assert second.returncode == 0 and "has not been converted" not in second.stderr


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_temperature_must_be_finite(folder, value):
    result = run("--model", folder, "--prompt", "x", "--temperature", value)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "temp" in result.output


def frames_folder(root, name: str, count: int, seed: int):
    folder = root / name
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_several_videos_and_a_one_frame_clip(folder, photo, tmp_path):
    result = run(
        "--model", folder, "--image", photo,
        "--video", frames_folder(tmp_path, "clip", 4, seed=1),
        "--video", frames_folder(tmp_path, "still", 1, seed=2),
        "--prompt", "What changed?", "--max-tokens", "3", "--temp", "0",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "stopped:" in result.stderr


def test_a_video_past_its_token_budget_comes_with_a_note(folder, tmp_path):
    """12 frames of 84x56, at the default frame limits enlarged to 392x280 (140 tokens a pair,
    also the smallest size they may have), take 840 tokens: a budget of 300 keeps 2 pairs of
    them, evenly spaced, and says so; one below a pair is refused."""
    clip = frames_folder(tmp_path, "clip", 12, seed=3)
    args = ["--model", folder, "--video", clip, "-p", "What happens?", "-m", "2", "--temp", "0"]
    result = run(*args, "--video-max-tokens", "300")
    assert result.exit_code == 0, result.output
    assert (
        "note: clip: 12 frames at 392x280 would take 840 tokens, more than --video-max-tokens "
        "(300): 4 of the 12 frames kept, evenly spaced"
    ) in result.stderr
    assert "note:" not in run(*args).stderr
    refused = run(*args, "--video-max-tokens", "100")
    assert refused.exit_code == 1
    assert "--video-max-tokens (100) is less than one pair of frames" in refused.output
    assert "raise --video-max-tokens or lower --video-min-pixels" in refused.output


def test_an_image_as_a_video_is_refused(folder, photo):
    result = run("--model", folder, "--video", photo, "--prompt", "x")
    assert result.exit_code == 1 and "not a video: give it as an image" in result.output


def test_a_folder_as_an_image_is_refused(folder, tmp_path):
    result = run("--model", folder, "--image", tmp_path, "--prompt", "x")
    assert result.exit_code == 1 and "is a folder, not an image" in result.output


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    """The tiny model with a 90-token context."""
    short = tmp_path_factory.mktemp("short-context")
    write_model_folder(short, seed=21)
    config = json.loads((short / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 90
    (short / "config.json").write_text(json.dumps(config))
    return short


def test_max_tokens_capped_by_the_context_with_a_notice(short_context):
    result = run(
        "--model", short_context, "--prompt", "Tell me a story.", "-m", "500", "--temp", "0"
    )
    assert result.exit_code == 0, result.output
    prompt_tokens = int(result.stderr.split("the prompt takes ")[1].split()[0])
    notice = f"at most {90 - prompt_tokens} tokens will be generated (--max-tokens 500)"
    assert notice in result.stderr
    stats = result.stderr.strip().splitlines()[-1]
    assert stats.endswith(("stopped: context full (90 tokens)", "stopped: end of answer"))


def test_stats_line_says_why_generation_ended(folder):
    result = run("--model", folder, "--prompt", "Tell me a story.", "-m", "2", "--temp", "0")
    assert result.exit_code == 0
    assert result.stderr.strip().splitlines()[-1].endswith("stopped: max tokens (2)")


@pytest.mark.parametrize(
    "hide, expected",
    [(False, "<think>a</think>b\n<think>c</think>d\n"), (True, "bd\n")],
)
def test_every_think_block_is_reasoning_when_piped(capsys, hide, expected):
    from mimo_mlx.cli.console import StreamPrinter

    printer = StreamPrinter(hide_thinking=hide, opened=False)
    for piece in "<think>a</think>\n\nb<think>c</think>d":
        printer.write(piece)
    printer.close()
    assert capsys.readouterr().out == expected.replace("b\n<think>", "b\n<think>")


def test_help_does_not_import_mlx():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from mimo_mlx.cli.main import main\n"
        "for args in (['--help'], ['generate', '--help']):\n"
        "    assert CliRunner().invoke(main, args).exit_code == 0\n"
        "print(sorted(m for m in ('mlx', 'mlx.core', 'mimo_mlx.model.mimo_vl') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_no_think_help_names_the_model_versions():
    text = " ".join(CliRunner().invoke(main, ["generate", "--help"]).output.split())
    assert "2508 models" in text and "original RL and SFT" in text
