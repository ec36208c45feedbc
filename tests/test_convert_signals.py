"""SIGTERM and SIGHUP unwind a conversion like Ctrl-C; what SIGKILL leaves, the next run removes.

Real processes get real signals once their hidden folder exists. A run killed outright is simulated
by SIGKILL, and a live one by a hidden folder named after a running `sleep` process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner
from convert_helpers import leftovers, make_slow_source, make_source

from mimo_mlx.cli.main import main
from mimo_mlx.convert import convert, output, pipeline


@pytest.fixture(scope="module")
def slow_source(tmp_path_factory):
    return make_slow_source(tmp_path_factory.mktemp("slow") / "model")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("src") / "model", wide=False)


def start(source, target) -> subprocess.Popen:
    command = [sys.executable, "-m", "mimo_mlx", "convert", "--hf-path", str(source)]
    command += ["--mlx-path", str(target)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_hidden_folder(process, target):
    """The run's `.name.*.partial` folder, as soon as it exists (the run is then writing weights)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if target.parent.is_dir():
            for entry in target.parent.iterdir():
                if entry.name.startswith(f".{target.name}.") and entry.name.endswith(".partial"):
                    return entry
        if process.poll() is not None:
            pytest.fail(f"the run ended ({process.returncode}) first: {process.stderr.read()}")
        time.sleep(0.002)
    process.kill()
    pytest.fail("no hidden folder appeared within a minute")


def dead_pid() -> int:
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


def hidden(target, pid, kind="partial", host=output.HOST_TAG):
    return target.parent / f".{target.name}.{host}-{pid}-0123abcd.{kind}"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_signal_midway_leaves_nothing(slow_source, tmp_path, signum):
    target = tmp_path / "made" / "out"  # its parent folder is made by the run, and removed again
    process = start(slow_source, target)
    wait_for_hidden_folder(process, target)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, stderr
    assert stderr.rstrip().endswith(f"terminated by {signum.name}") and "Traceback" not in stderr
    assert os.listdir(tmp_path) == []


def test_debris_of_a_killed_run_is_removed_by_the_next(slow_source, source, tmp_path):
    target = tmp_path / "out"
    process = start(slow_source, target)
    debris = wait_for_hidden_folder(process, target)
    process.kill()
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert leftovers(tmp_path, "out") == [debris.name]
    convert(hf_path=str(source), mlx_path=str(target))
    assert leftovers(tmp_path, "out") == ["out"]


def test_debris_of_a_live_run_is_left_alone(source, tmp_path):
    target = tmp_path / "out"
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        live = hidden(target, sleeper.pid)
        live.mkdir()
        (live / "config.json").write_text("{}")
        convert(hf_path=str(source), mlx_path=str(target))
        assert (live / "config.json").read_text() == "{}"
    finally:
        sleeper.kill()
        sleeper.wait()
    convert(hf_path=str(source), mlx_path=str(target), force=True)  # its owner is gone now
    assert leftovers(tmp_path, "out") == ["out"]


def test_only_our_own_debris_is_removed(source, tmp_path):
    target = tmp_path / "out"
    pid = dead_pid()
    ours = hidden(target, pid)
    ours.mkdir()
    (ours / "model-00001-of-00001.safetensors").write_bytes(b"half")
    kept = {
        hidden(
            target, pid, host="feedbeef"
        ): "config.json",  # another machine's: its pid says nothing
        target.parent / ".out.0123abcd.partial": "config.json",  # names no owner
        hidden(target.parent / "other", pid): "config.json",  # another target's
    }
    with_user_file = hidden(target, dead_pid(), kind="old")
    kept[with_user_file] = "notes.txt"  # holds what a conversion does not leave
    for folder, name in kept.items():
        folder.mkdir()
        (folder / name).write_text("keep")
    link = hidden(target, dead_pid())
    link.symlink_to(with_user_file)
    convert(hf_path=str(source), mlx_path=str(target))
    assert not ours.exists() and link.is_symlink()
    assert all((folder / name).read_text() == "keep" for folder, name in kept.items())


def test_a_replaced_output_left_aside_is_put_back(source, tmp_path):
    """Killed between moving the old output aside and moving the new one in: the next run puts the
    old one back instead of losing it, then refuses as it would have."""
    earlier = tmp_path / "earlier"
    convert(hf_path=str(source), mlx_path=str(earlier), q_bits=8)
    target = tmp_path / "out"
    aside = hidden(target, dead_pid(), kind="old")
    aside.mkdir()
    shutil.copytree(earlier, aside / "out")
    result = CliRunner().invoke(
        main, ["convert", "--hf-path", str(source), "--mlx-path", str(target)]
    )
    assert result.exit_code == 1 and "already exists; pass --force" in result.stderr
    assert json.loads((target / "config.json").read_text())["quantization"]["bits"] == 8
    assert leftovers(tmp_path, "out") == ["out"]
    aside.mkdir()
    shutil.copytree(earlier, aside / "out")  # killed after the new output was in place
    convert(hf_path=str(source), mlx_path=str(target), force=True)
    assert leftovers(tmp_path, "out") == ["out"]


def signal_on_write(monkeypatch, signum, after: int):
    """Make the conversion send itself `signum` once `after` blocks are on disk."""
    real_write = pipeline.ShardedWriter.write
    calls = []

    def write_then_signal(self, name, data):
        real_write(self, name, data)
        calls.append(name)
        if len(calls) == after:
            # Never signal the test process unless the converter is there to catch it.
            assert signal.getsignal(signum) not in (signal.SIG_DFL, signal.SIG_IGN, None)
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(pipeline.ShardedWriter, "write", write_then_signal)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_handlers_are_restored(source, tmp_path, monkeypatch, signum):
    before = signal.getsignal(signum)
    convert(hf_path=str(source), mlx_path=str(tmp_path / "done"))
    assert signal.getsignal(signum) is before
    signal_on_write(monkeypatch, signum, after=20)
    result = CliRunner().invoke(
        main, ["convert", "--hf-path", str(source), "--mlx-path", str(tmp_path / "out")]
    )
    assert result.exit_code == 128 + signum, result.output
    assert f"terminated by {signal.Signals(signum).name}" in result.stderr
    assert leftovers(tmp_path, "out") == []
    assert signal.getsignal(signum) is before


def test_a_signal_while_moving_into_place_waits_for_the_move(source, tmp_path, monkeypatch):
    """Half a swap would leave the old output aside: the signal takes effect once it is done."""
    earlier = tmp_path / "out"
    convert(hf_path=str(source), mlx_path=str(earlier), q_bits=8)
    real_move = output.move_into_place

    def signal_then_move(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        real_move(*args)

    monkeypatch.setattr(output, "move_into_place", signal_then_move)
    args = ["--hf-path", str(source), "--mlx-path", str(earlier), "--force"]
    result = CliRunner().invoke(main, ["convert", *args])
    assert result.exit_code == 128 + signal.SIGTERM
    assert json.loads((earlier / "config.json").read_text())["quantization"]["bits"] == 4
    assert leftovers(tmp_path, "out") == ["out"]


def test_outside_the_main_thread_no_handler_is_installed(source, tmp_path):
    """Python lets only the main thread set handlers; elsewhere the conversion runs as it is."""
    before = signal.getsignal(signal.SIGTERM)
    errors = []

    def run():
        try:
            convert(hf_path=str(source), mlx_path=str(tmp_path / "out"))
        except BaseException as error:  # noqa: BLE001  (reported below, in the main thread)
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert errors == [] and (tmp_path / "out" / "config.json").is_file()
    assert signal.getsignal(signal.SIGTERM) is before
