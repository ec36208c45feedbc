"""--mlx-path and --force: only an earlier conversion is ever replaced, and a refusal is one line.

Every case runs in tmp_path: the "current folder" and "home folder" are made there with
monkeypatch.chdir and $HOME, and each is first made an earlier conversion, the kind of folder --force
would otherwise replace, so only the rule under test stands between it and deletion.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner
from convert_helpers import leftovers, make_source, split_shards

from mimo_mlx.cli.main import main
from mimo_mlx.convert import convert


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("src") / "model", wide=False)


@pytest.fixture(scope="module")
def earlier(source, tmp_path_factory):
    """An earlier conversion's output folder, copied wherever a test needs one."""
    out = tmp_path_factory.mktemp("earlier") / "out"
    convert(hf_path=str(source), mlx_path=str(out), q_bits=8)
    return out


def snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def run(source, mlx_path, *options):
    args = ["convert", "--hf-path", str(source), "--mlx-path", str(mlx_path), *options]
    return CliRunner().invoke(main, args)


def assert_refused(result, *words):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


@pytest.mark.parametrize("blank", ["", " ", "\t\n"])
@pytest.mark.parametrize("force", [[], ["--force"]])
def test_empty_mlx_path_is_refused(source, earlier, tmp_path, monkeypatch, blank, force):
    """`--mlx-path "$UNSET"` once converted into the current folder, deleting all it held."""
    cwd = shutil.copytree(earlier, tmp_path / "cwd")
    before = snapshot(cwd)
    monkeypatch.chdir(cwd)
    assert_refused(run(source, blank, *force), "--mlx-path", "is empty")
    assert snapshot(cwd) == before


@pytest.mark.parametrize(
    "spelling, words",
    [
        (".", "is the current folder"),
        ("{cwd}", "is the current folder"),
        ("../cwd/", "is the current folder"),
        ("..", "holds the current folder"),
    ],
)
def test_current_folder_is_never_replaced(source, earlier, tmp_path, monkeypatch, spelling, words):
    cwd = shutil.copytree(earlier, tmp_path / "outer" / "cwd")
    before = snapshot(tmp_path / "outer")
    monkeypatch.chdir(cwd)
    assert_refused(run(source, spelling.format(cwd=cwd), "--force"), words)
    assert snapshot(tmp_path / "outer") == before


@pytest.mark.parametrize("spelling, words", [("~", ["is your home folder"]), ("~/..", ["holds"])])
def test_home_folder_is_never_replaced(source, earlier, tmp_path, monkeypatch, spelling, words):
    home = shutil.copytree(earlier, tmp_path / "users" / "me")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path / "users")
    assert_refused(run(source, spelling, "--force"), *words, "your home folder")
    assert snapshot(tmp_path / "users") == before


@pytest.mark.parametrize(
    "root",
    [
        "/",
        pytest.param(
            "/proc", marks=pytest.mark.skipif(not os.path.ismount("/proc"), reason="no /proc")
        ),
    ],
)
def test_filesystem_root_is_never_replaced(source, root):
    before = sorted(os.listdir(root)) if root == "/" else None
    assert_refused(run(source, root, "--force"), f"--mlx-path {root} is the root of a filesystem")
    if before is not None:
        assert sorted(os.listdir(root)) == before


def add_stray(folder):
    (folder / "notes.txt").write_text("mine")


def add_subfolder(folder):
    (folder / "images").mkdir()
    (folder / "images" / "cat.png").write_bytes(b"png")


def strip_section(folder):
    config = json.loads((folder / "config.json").read_text())
    del config["mimo_mlx"]
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "spoil, words",
    [
        (add_stray, ["holds files that mimo-mlx convert does not write (notes.txt)"]),
        (add_subfolder, ["does not write (images/)"]),
        (strip_section, ["config.json without the mimo_mlx section"]),
        (lambda f: (f / "config.json").unlink(), ["has no config.json"]),
    ],
)
@pytest.mark.parametrize("force", [[], ["--force"]])
def test_folder_with_other_files_is_never_replaced(source, earlier, tmp_path, spoil, words, force):
    out = shutil.copytree(earlier, tmp_path / "out")
    spoil(out)
    before = snapshot(out)
    assert_refused(run(source, out, *force), f"{out} already exists and", *words)
    assert snapshot(out) == before
    assert leftovers(tmp_path, "out") == ["out"]


def test_a_checkpoint_folder_is_never_replaced(source, tmp_path):
    """A Hugging Face checkpoint holds only names a conversion also writes; its config.json tells."""
    other = make_source(tmp_path / "out", wide=False, seed=9)
    split_shards(other)  # model-0000N-of-00002.safetensors and an index: names we write too
    before = snapshot(other)
    assert_refused(run(source, other, "--force"), "without the mimo_mlx section")
    assert snapshot(other) == before


def test_a_file_or_a_link_is_never_replaced(source, earlier, tmp_path):
    (tmp_path / "file").write_text("mine")
    assert_refused(run(source, tmp_path / "file", "--force"), "already exists and is a file")
    assert (tmp_path / "file").read_text() == "mine"
    (tmp_path / "link").symlink_to(earlier)
    assert_refused(run(source, tmp_path / "link", "--force"), "is a symbolic link")
    assert (tmp_path / "link").is_symlink() and (earlier / "config.json").is_file()


def test_earlier_conversion_is_replaced_only_with_force(source, earlier, tmp_path):
    out = shutil.copytree(earlier, tmp_path / "out")
    (out / ".DS_Store").write_bytes(b"Finder")  # macOS puts it in any folder it shows
    assert_refused(run(source, out), f"{out} already exists; pass --force to replace it")
    result = run(source, out, "--force", "--q-bits", "4")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    assert not (out / ".DS_Store").exists()
    assert leftovers(tmp_path, "out") == ["out"]


def test_an_empty_folder_is_used_with_force(source, tmp_path):
    (tmp_path / "out").mkdir()
    assert_refused(run(source, tmp_path / "out"), "already exists; pass --force")
    assert run(source, tmp_path / "out", "--force").exit_code == 0
    assert (tmp_path / "out" / "config.json").is_file()


def test_the_checkpoint_is_never_replaced(source, earlier, tmp_path):
    # A float conversion can itself be converted again; it must not overwrite itself.
    floats = tmp_path / "floats"
    convert(hf_path=str(source), mlx_path=str(floats), no_quantize=True)
    before = snapshot(floats)
    assert_refused(run(floats, floats, "--force"), "would replace the checkpoint being converted")
    assert_refused(run(floats, tmp_path, "--force"), "would replace the checkpoint")
    inside = shutil.copytree(earlier, floats / "q8")
    assert_refused(run(floats, inside, "--force"), "lies inside the checkpoint being converted")
    assert snapshot(floats) == {**before, **snapshot_under(inside, "q8")}


def snapshot_under(folder, prefix):
    return {f"{prefix}/{k}": v for k, v in snapshot(folder).items()}


def test_a_new_folder_inside_the_checkpoint_is_fine(source, tmp_path):
    """`cd checkpoint && mimo-mlx convert --hf-path . --mlx-path mlx` replaces nothing."""
    local = shutil.copytree(source, tmp_path / "model")
    result = run(local, local / "mlx-4bit")
    assert result.exit_code == 0, result.output
    assert (local / "mlx-4bit" / "config.json").is_file()


def test_help_says_what_force_replaces():
    text = " ".join(CliRunner().invoke(main, ["convert", "--help"]).output.split())
    assert "--force Replace --mlx-path if an earlier conversion wrote it." in text
    assert "the current or home folder, a filesystem root and the checkpoint are never" in text
