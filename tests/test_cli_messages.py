"""What the command line says: each mistake one line naming the flag as typed, warnings one line,
and every command's --help readable in an 80-column terminal."""

from __future__ import annotations

import inspect
import os
import re
import socket
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner
from PIL import Image
from test_generate import write_model_folder

from mimo_mlx.cli.main import main
from mimo_mlx.convert import convert


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_model_folder(tmp_path_factory.mktemp("tiny-messages"), seed=21)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("messages-photo") / "photo.png"
    Image.new("RGB", (120, 90), (90, 140, 200)).save(path)
    return path


def invoke(*args, input: str | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def one_error(result, status: int) -> str:
    """The one line a mistake prints (nothing else on stderr or stdout), without 'error: '."""
    assert result.exit_code == status, result.output
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.output
    assert result.stderr.startswith("error: ")
    return result.stderr.removeprefix("error: ").rstrip("\n")


@pytest.mark.parametrize(
    "args, line",
    [
        (["generate", "--max-pixels", "0"], "--max-pixels must be at least 1, got 0"),
        (["generate", "--temp", "-1"], "--temp must be at least 0, got -1"),
        (["generate", "--temperature=-1"], "--temperature must be at least 0, got -1"),
        (["generate", "-m", "0"], "-m (--max-tokens) must be at least 1, got 0"),
        (["generate", "--fps", "0"], "--fps must be above 0, got 0"),
        (["generate", "--max-tokens", "many"], "--max-tokens must be an integer, at least 1, got many"),
        (["chat", "--top-p", "2"], "--top-p must be between 0 and 1, got 2"),
        (["chat", "--max-kv-size", "0"], "--max-kv-size must be at least 1, got 0"),
        (["serve", "--port", "70000"], "--port must be between 0 and 65535, got 70000"),
        (["serve", "--fetch-timeout", "0"], "--fetch-timeout must be above 0, got 0"),
        (["serve", "--cache-bytes", "lots"], "--cache-bytes: 'lots' is not a size (e.g. 2GiB, 512MB, 1048576)"),  # noqa: E501
        (["annotate", "--image", "x.png", "--answer", "a", "--max-pixels", "0"], "--max-pixels must be at least 1, got 0"),  # noqa: E501
        (["convert", "--hf-path", "x", "--mlx-path", "y", "--q-bits", "7"], "--q-bits 7 is not supported: choose one of 2, 3, 4, 5, 6, 8"),  # noqa: E501
    ],
)  # fmt: skip
def test_a_value_out_of_range_is_one_line_and_status_1(args, line):
    assert one_error(invoke(*args), 1) == line


def test_a_flag_that_does_not_exist_is_one_line_and_status_2():
    line = one_error(invoke("generate", "--max-pixel", "5"), 2)
    assert line.startswith("no such option") and "--max-pixels" in line
    assert line.endswith("('mimo-mlx generate --help' lists the options)")


@pytest.mark.parametrize(
    "args, line",
    [
        (["annotate", "--answer", "a.txt"], "missing option '--image'. ('mimo-mlx annotate --help' lists the options)"),  # noqa: E501
        (["convert", "--hf-path", "x"], "missing option '--mlx-path'. ('mimo-mlx convert --help' lists the options)"),  # noqa: E501
        (["random-model"], "missing argument 'FOLDER'. ('mimo-mlx random-model --help' lists the options)"),  # noqa: E501
        (["frob"], "no such command 'frob'. ('mimo-mlx --help' lists the commands)"),
        (["--frob"], "no such option '--frob'. ('mimo-mlx --help' lists the options)"),
    ],
)  # fmt: skip
def test_a_missing_flag_or_an_unknown_command_is_one_line_and_status_2(args, line):
    assert one_error(invoke(*args), 2) == line


@pytest.mark.parametrize(
    "args, stdin, line",
    [
        (["-p", ""], None, "the --prompt is empty: there is no question to answer"),
        (["-p", "  \n"], None, "the --prompt is empty: there is no question to answer"),
        (["-p", "-"], "", "--prompt - read nothing from stdin: there is no question to answer"),
    ],
)
def test_an_empty_prompt_is_refused(folder, args, stdin, line):
    assert one_error(invoke("generate", "--model", folder, *args, input=stdin), 1) == line


def test_a_file_that_cannot_be_read_or_written_says_why_in_words(folder, photo, tmp_path):
    """Python's '[Errno 2] No such file or directory: ...' is not shown; a file in the way of an
    output path is called a file."""
    (tmp_path / "answer.txt").write_text('[{"bbox_2d": [1, 2, 30, 40], "label": "x"}]')
    (tmp_path / "latin1.json").write_bytes(b'{"title": "caf\xe9"}')
    cases = [
        (["generate", "--model", folder, "-p", "x", "--json-schema", tmp_path / "no.json"],
         f"cannot read the JSON schema {tmp_path / 'no.json'}: there is no such file"),
        (["generate", "--model", folder, "-p", "x", "--json-schema", tmp_path],
         f"cannot read the JSON schema {tmp_path}: it is a folder"),
        (["generate", "--model", folder, "-p", "x", "--json-schema", tmp_path / "latin1.json"],
         f"cannot read the JSON schema {tmp_path / 'latin1.json'}: it is not UTF-8 text"),
        (["annotate", "--image", photo, "--answer", tmp_path / "no.txt"],
         f"cannot read the answer from {tmp_path / 'no.txt'}: there is no such file"),
        (["annotate", "--image", photo, "--answer", tmp_path / "answer.txt", "--out",
          tmp_path / "answer.txt" / "out.png"],
         f"cannot write {tmp_path / 'answer.txt' / 'out.png'}: {tmp_path / 'answer.txt'} is a "
         "file, not a folder"),
    ]  # fmt: skip
    for args, line in cases:
        assert one_error(invoke(*args), 1) == line


def test_library_messages_name_the_flags_typed(folder, photo):
    result = invoke(
        "generate", "--model", folder, "--image", photo, "-p", "Hi", "--max-pixels", 100
    )
    assert one_error(result, 1) == (
        "--max-pixels (100) is below --min-pixels (3136, the model's): no size fits both; give a "
        "larger --max-pixels or a smaller --min-pixels"
    )
    result = invoke("generate", "--model", folder, "-p", "Hi", "--temperature", "inf")
    assert one_error(result, 1).startswith("--temperature must be a finite number >= 0")
    result = invoke("generate", "--model", folder, "-p", "Hi", "--max-matching-ngram-size", 3)
    assert one_error(result, 1) == (
        "--max-matching-ngram-size applies to prompt lookup: also pass --prompt-lookup"
    )


def test_a_warning_is_one_line(folder, tmp_path):
    """Prompt lookup on a quantized model on the CPU cannot be faster: said in one line, not as
    Python's warning with its source file and line of code."""
    quantized = tmp_path / "tiny-4bit"
    convert(hf_path=str(folder), mlx_path=str(quantized), q_group_size=32)
    command = [sys.executable, "-m", "mimo_mlx", "generate", "--model", str(quantized)]
    done = subprocess.run(
        [*command, "-p", "Hi Hi", "-m", "3", "--prompt-lookup"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "warn" in line.lower()]
    assert len(warned) == 1 and warned[0].startswith(
        "warning: prompt lookup with a quantized model on the CPU is not faster"
    ), done.stderr
    assert "UserWarning" not in done.stderr and ".py:" not in done.stderr


def test_a_busy_port_is_found_before_anything_claims_to_serve(folder):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "mimo_mlx", "serve", "--model", str(folder)]
        done = subprocess.run(
            [*command, "--port", str(port)], capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 1 and "serving" not in done.stderr, done.stderr
    assert done.stderr == (
        f"error: port {port} on 127.0.0.1 is in use (another server?): stop it, or choose "
        "another --port\n"
    )


# ---------------------------------------------------------------- --help in 80 columns

COMMANDS = ["", "generate", "chat", "serve", "convert", "annotate", "random-model"]


def command_of(name: str) -> click.Command:
    return main if not name else main.get_command(click.Context(main), name)


def rendered_help(name: str) -> str:
    """--help as an 80-column terminal shows it (CliRunner would force another width)."""
    command = [sys.executable, "-m", "mimo_mlx", *name.split(), "--help"]
    env = {**os.environ, "COLUMNS": "80"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def examples(command: click.Command) -> list[str]:
    """The lines of the help's example blocks (the paragraphs marked \\b, as written)."""
    doc = inspect.cleandoc(command.help or "")
    blocks = [block for block in doc.split("\n\n") if block.startswith("\b")]
    return [line.strip() for block in blocks for line in block.splitlines()[1:] if line.strip()]


@pytest.mark.parametrize("name", COMMANDS)
def test_help_fits_80_columns_with_examples_whole(name):
    text = rendered_help(name)
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    assert not [line for line in lines if re.search(r"\w-$", line)], "a word broken at a hyphen"
    shown = {line.strip() for line in lines}
    for example in examples(command_of(name)):
        assert example in shown, f"{example!r} is broken across lines"
    if name:
        assert examples(command_of(name)), "each command shows an example"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_says_what_it_does(name):
    for param in command_of(name).params:
        if isinstance(param, click.Option) and not param.hidden:
            words = re.sub(r"\s*\[default: [^\]]*\]$", "", param.help or "").strip()
            assert re.match(r"[A-Z'(].* .*[.)]$", words, re.S), f"{param.opts}: {param.help!r}"
