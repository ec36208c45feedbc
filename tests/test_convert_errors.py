"""Bad input to `mimo-mlx convert`: one-line error, exit 1, no traceback, nothing at --mlx-path."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from convert_helpers import edit_tensors, leftovers, make_source, split_shards

from mimo_mlx.cli.main import main
from mimo_mlx.convert import convert, pipeline


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    folder = make_source(tmp_path_factory.mktemp("pristine") / "model", wide=False)
    split_shards(folder, parts=2)
    return folder


@pytest.fixture
def folder(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "model")


def run_cli(tmp_path, *args):
    """Invoke the real CLI group; returns the result and the --mlx-path used."""
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", "--mlx-path", str(out), *args])
    return result


def assert_clean_failure(result, tmp_path, message):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.exception is not None
    # stderr may also hold the progress bar's label; the error itself is one line, and the last.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr
    assert message in errors[0], errors[0]
    assert leftovers(tmp_path, "out") == []


def edit_config(folder, change):
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


class Payload:
    """A pickle that leaves a marker file behind if anything ever unpickles it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def add_unreadable_shard(folder, tmp_path):
    """Without an index every *.safetensors is a shard; one that cannot be opened, even by root."""
    (folder / "model.safetensors.index.json").unlink()
    (folder / "zz.safetensors").mkdir()


def make_pickle_only(folder, tmp_path):
    for file in [*folder.glob("*.safetensors"), folder / "model.safetensors.index.json"]:
        file.unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(tmp_path / "unpickled")))


@pytest.mark.parametrize(
    "break_it, message",
    [
        (
            lambda f, t: edit_config(f, lambda c: c.update(model_type="llama")),
            "model_type is 'llama'",
        ),
        (lambda f, t: edit_config(f, lambda c: c.pop("vision_config")), "vision_config is missing"),
        (
            lambda f, t: edit_config(f, lambda c: c["text_config"].pop("hidden_size")),
            "lacks text_config.hidden_size",
        ),
        (
            lambda f, t: edit_config(f, lambda c: c["vision_config"].update(intermediate_size=80)),
            "do not match its config.json: wrong shape: visual.blocks.0.mlp.gate_proj.weight "
            "(48, 32) (model expects (80, 32))",
        ),
        (
            lambda f, t: edit_config(f, lambda c: c.update(quantization_config={"bits": 4})),
            "already quantized",
        ),
        (
            lambda f, t: (f / "model-00002-of-00002.safetensors").unlink(),
            "missing weight shards listed in model.safetensors.index.json: "
            "model-00002-of-00002.safetensors",
        ),
        (
            lambda f, t: (f / "model-00002-of-00002.safetensors").write_bytes(
                (f / "model-00002-of-00002.safetensors").read_bytes()[:-100]
            ),
            "is truncated",
        ),
        (make_pickle_only, "never loads pickles"),
        ((lambda f, t: (f / "tokenizer.json").unlink()), "has no tokenizer.json"),
        (
            lambda f, t: edit_tensors(
                f / "model-00001-of-00002.safetensors",
                lambda d: d.update({"model.norm.weight": np.ones(64, np.int64)}),
            ),
            "is I64; only float checkpoints",
        ),
        (add_unreadable_shard, "cannot read {folder}/zz.safetensors (Is a directory)"),
    ],
)
def test_bad_checkpoint(folder, tmp_path, break_it, message):
    break_it(folder, tmp_path)
    result = run_cli(tmp_path, "--hf-path", str(folder))
    assert_clean_failure(result, tmp_path, message.format(folder=folder))
    assert not (tmp_path / "unpickled").exists()


@pytest.mark.parametrize(
    "options, message",
    [
        (["--q-bits", "7"], "--q-bits 7 is not supported: choose one of 2, 3, 4, 5, 6, 8"),
        (["--q-group-size", "48"], "--q-group-size 48 is not supported: choose one of 32, 64, 128"),
        (["--dtype", "float64"], "--dtype float64 is not supported"),
        (["--vision-bits", "1"], "--vision-bits 1 is not supported"),
        (["--merger-bits", "half"], "--merger-bits half is not supported"),
        (["--no-quantize", "--vision-bits", "8"], "--no-quantize keeps every part in float"),
        (["--revision", "main"], "--revision pins a Hugging Face repo"),
    ],
)
def test_bad_options(pristine, tmp_path, options, message):
    result = run_cli(tmp_path, "--hf-path", str(pristine), *options)
    assert_clean_failure(result, tmp_path, message)


def test_neither_folder_nor_repo_id(tmp_path):
    result = run_cli(tmp_path, "--hf-path", str(tmp_path / "no" / "such" / "folder"))
    assert_clean_failure(result, tmp_path, "is neither an existing folder nor a Hugging Face repo")
    (tmp_path / "file.safetensors").write_bytes(b"x")
    result = run_cli(tmp_path, "--hf-path", str(tmp_path / "file.safetensors"))
    assert_clean_failure(result, tmp_path, "is a file")


def test_failure_midway_leaves_nothing(folder, tmp_path, monkeypatch):
    """A float16 overflow in the second shard is found only while converting, after the first
    shard's tensors were written: the half-written folder must vanish, temp folder included."""
    late = "visual.merger.mlp.2.weight"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert index["weight_map"][late] == "model-00002-of-00002.safetensors"
    edit_tensors(folder / index["weight_map"][late], lambda d: d[late].__setitem__((0, 0), 1e6))
    removed = []
    real_rmtree = shutil.rmtree

    def spy(path, *args, **kwargs):  # records what the failed run had written, then removes it
        removed.append({p.name: p.stat().st_size for p in path.iterdir()})
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(pipeline.shutil, "rmtree", spy)
    result = run_cli(tmp_path, "--hf-path", str(folder), "--dtype", "float16")
    assert_clean_failure(result, tmp_path, f"{late} has values that are NaN or infinite")
    assert "--dtype bfloat16" in result.stderr
    (written,) = removed
    assert written["model-00001-of-00001.safetensors"] > 50_000  # earlier tensors were on disk
    monkeypatch.undo()
    convert(hf_path=str(folder), mlx_path=str(tmp_path / "out"), dtype="bfloat16")  # the cure


def test_error_through_a_real_process(folder, tmp_path):
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"\x10\x00\x00\x00")
    out = tmp_path / "out"
    command = "from mimo_mlx.cli.main import main; main()"
    args = ["convert", "--hf-path", str(folder), "--mlx-path", str(out)]
    done = subprocess.run([sys.executable, "-c", command, *args], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: {folder / 'model-00002-of-00002.safetensors'} is truncated "
        f"(it is 4 bytes long); download it again"
    ]
    assert leftovers(tmp_path, "out") == []


def test_ctrl_c_midway_leaves_nothing(folder, tmp_path, monkeypatch):
    """Ctrl-C after some blocks are on disk: exit 130, and no output or temp folder remains."""
    real_write = pipeline.ShardedWriter.write
    calls = []

    def write_then_interrupt(self, name, data):
        real_write(self, name, data)
        calls.append(name)
        if len(calls) == 20:
            raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.ShardedWriter, "write", write_then_interrupt)
    result = run_cli(tmp_path, "--hf-path", str(folder))
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert len(calls) == 20
    assert leftovers(tmp_path, "out") == []


def convert_to(source, mlx_path, *options):
    args = ["convert", "--hf-path", str(source), "--mlx-path", str(mlx_path), *options]
    return CliRunner().invoke(main, args)


def assert_one_line(result, message):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.exception is not None
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr
    assert message in errors[0], errors[0]


@pytest.mark.parametrize("below", ["sub", "sub/deeper/out"])
def test_output_below_a_file(pristine, tmp_path, below):
    """A path component that is a file fails for root too."""
    (tmp_path / "somefile").write_text("mine")
    target = tmp_path / "somefile" / below
    result = convert_to(pristine, target)
    assert_one_line(
        result, f"cannot create {target}: {tmp_path / 'somefile'} is a file, not a folder"
    )
    assert os.listdir(tmp_path) == ["somefile"] and (tmp_path / "somefile").read_text() == "mine"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_output_in_a_filesystem_that_takes_no_folders(pristine):
    result = convert_to(pristine, "/proc/mimo-mlx-test")
    assert_one_line(result, "cannot write /proc/mimo-mlx-test: No such file or directory (/proc)")
    assert not any("mimo-mlx-test" in name for name in os.listdir("/proc"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
@pytest.mark.parametrize("below", ["out", "new/out"])
def test_output_in_a_folder_without_write_permission(pristine, tmp_path, below):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        result = convert_to(pristine, locked / below)
    finally:
        locked.chmod(0o755)
    assert_one_line(result, f"cannot write {locked / below}: Permission denied")
    assert "choose an --mlx-path in a folder you may write to" in result.stderr
    assert os.listdir(locked) == []


@pytest.mark.parametrize(
    "code, advice",
    [
        (errno.ENOSPC, "; the converted model needs 426.14 kB: free space there, or choose"),
        (errno.EDQUOT, "needs 426.14 kB: free some of your quota there"),
        (errno.EROFS, "that filesystem is read-only"),
        (errno.EACCES, "a folder you may write to"),
        (errno.EIO, "choose another --mlx-path"),
    ],
)
def test_write_failure_midway_leaves_nothing(folder, tmp_path, monkeypatch, code, advice):
    """The disk fills (or goes read-only, ...) after some blocks are on disk: one line, exit 1, and
    neither the hidden folder nor the parent folders made for it remain."""
    real_write = pipeline.ShardedWriter.write
    calls = []

    def write_then_fail(self, name, data):
        real_write(self, name, data)
        calls.append(name)
        if len(calls) == 20:
            raise OSError(code, os.strerror(code))

    monkeypatch.setattr(pipeline.ShardedWriter, "write", write_then_fail)
    target = tmp_path / "new" / "deeper" / "out"
    result = convert_to(folder, target)
    assert_one_line(result, f"cannot write {target}: {os.strerror(code)} ({target.parent}); ")
    assert advice in result.stderr
    assert not (tmp_path / "new").exists()
