"""`mimo-mlx random-model`: a folder that generate, chat and serve accept, made without the hub or
the reference libraries, and labelled as random weights everywhere it is seen."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from openai import OpenAI
from PIL import Image
from server_process import ServerProcess, data_url

FORBID_REFERENCES = """
import sys

class Forbid:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("transformers", "torch", "torchvision", "mlx_vlm"):
            raise ImportError("the runtime imported " + name)

sys.meta_path.insert(0, Forbid())
from mimo_mlx.cli.main import main
main()
"""


def mimo_mlx(*args, input: str | None = None, cwd=None) -> subprocess.CompletedProcess:
    """The command line in a process that may not import transformers, torch or mlx-vlm."""
    command = [sys.executable, "-c", FORBID_REFERENCES, *map(str, args)]
    return subprocess.run(
        command, input=input, capture_output=True, text=True, cwd=cwd, timeout=120
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    where = tmp_path_factory.mktemp("random-model")
    done = mimo_mlx("random-model", "tiny-random", cwd=where)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"wrote {where / 'tiny-random'}: a tiny model with random weights; every answer is "
        "gibberish\n"
    )
    return where / "tiny-random"


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("random-photo") / "photo.png"
    Image.new("RGB", (200, 150), (30, 120, 200)).save(path)
    return path


def test_the_folder_says_its_weights_are_random(folder):
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    card = (folder / "README.md").read_text()
    assert "random numbers, not a trained model: every answer is gibberish" in card
    config = json.loads((folder / "config.json").read_text())
    assert "every answer is gibberish" in config["random_weights"]
    assert not list(folder.parent.glob(".tiny-random*"))  # no hidden work folder left


def test_generate_accepts_it_and_says_it_answers_gibberish(folder, photo):
    done = mimo_mlx("generate", "--model", folder, "--image", photo, "-p", "What is this?", "-m", 8)
    assert done.returncode == 0, done.stderr
    note, stats = done.stderr.splitlines()
    assert note.startswith(f"note: {folder} has random weights") and "gibberish" in note
    assert stats.startswith("prompt: ") and "generation: 8 tokens" in stats


def test_chat_accepts_it(folder, photo, tmp_path):
    lines = f"Hi\n/image {photo}\nWhat is it?\n/save c.safetensors\n/load c.safetensors\n"
    done = mimo_mlx("chat", "--model", folder, "-m", 6, input=lines, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    stats = [line for line in done.stderr.splitlines() if line.startswith("prompt: ")]
    assert len(stats) == 2 and "reused" in stats[1]
    assert "(loaded c.safetensors: 2 turn(s)" in done.stderr


def test_serve_accepts_it(folder, photo, tmp_path):
    with ServerProcess(folder, tmp_path / "server.log") as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused")
        content = [
            {"type": "image_url", "image_url": {"url": data_url(photo)}},
            {"type": "text", "text": "What is in this picture?"},
        ]
        reply = client.chat.completions.create(
            model=str(folder), messages=[{"role": "user", "content": content}], max_tokens=6
        )
        assert reply.usage.completion_tokens == 6 and reply.choices[0].finish_reason == "length"
    assert "has random weights" in server.log()


def test_an_existing_path_is_never_replaced(folder):
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    done = mimo_mlx("random-model", folder)
    assert done.returncode == 1
    assert done.stderr == f"error: {folder} exists; give a new folder (nothing is ever replaced)\n"
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_a_damaged_random_model_is_made_again_not_downloaded(folder, tmp_path):
    """Nobody downloaded it: the remedy for a damaged file is the command that wrote it."""
    damaged = tmp_path / "tiny-random"
    shutil.copytree(folder, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    done = mimo_mlx("generate", "--model", damaged, "-p", "Hi", "-m", 2)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: {weights} is damaged or incomplete")
    assert done.stderr.endswith(
        f"{damaged} was written by mimo-mlx random-model: write it again (mimo-mlx random-model "
        "NEW_FOLDER)\n"
    )


def test_a_folder_it_cannot_make_is_one_true_line(tmp_path):
    (tmp_path / "a-file").write_text("mine")
    for target, line in [
        ("", "FOLDER '' is empty; give the folder to create (an unset shell variable expands to "
         "nothing)"),
        (tmp_path / "nowhere" / "tiny", f"the folder {tmp_path / 'nowhere'} does not exist"),
        (tmp_path / "a-file" / "tiny", f"{tmp_path / 'a-file'} is a file, not a folder"),
    ]:  # fmt: skip
        done = mimo_mlx("random-model", target)
        assert (done.returncode, done.stderr) == (1, f"error: {line}\n")
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    """A file-size limit stops MLX's write as a full disk would: one line, no traceback, no
    hidden work folder left."""
    script = (
        "import resource, signal\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))\n"
        + FORBID_REFERENCES
    )
    command = [sys.executable, "-c", script, "random-model", str(tmp_path / "tiny")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: cannot write {tmp_path / 'tiny'}: ")
    assert list(tmp_path.iterdir()) == []


def test_converting_a_damaged_random_model_says_to_make_it_again(folder, tmp_path):
    """The converter gives the same remedy as loading: the command that wrote the folder."""
    damaged = tmp_path / "tiny-random"
    shutil.copytree(folder, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    done = mimo_mlx("convert", "--hf-path", damaged, "--mlx-path", tmp_path / "out")
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: {weights} is truncated")
    assert done.stderr.endswith(
        f"{damaged} was written by mimo-mlx random-model: write it again (mimo-mlx random-model "
        "NEW_FOLDER)\n"
    )
    assert not (tmp_path / "out").exists()
