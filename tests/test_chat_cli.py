"""`mimo-mlx chat` as people use it: piped through a real process, and in a real terminal."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from test_generate import write_model_folder

MAX_PIXELS = str(28 * 28 * 64)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_model_folder(tmp_path_factory.mktemp("tiny-chat-cli"), seed=21)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat-photo") / "photo.png"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(path)
    return path


def chat(folder, lines: list[str], *args: str, cwd=None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mimo_mlx", "chat", "--model", str(folder), "--temp", "0"]
    command += ["--max-pixels", MAX_PIXELS, "-m", "8", *args]
    text = "".join(line + "\n" for line in lines)
    return subprocess.run(command, input=text, capture_output=True, text=True, cwd=cwd, timeout=120)


def stats_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("prompt: ")]


def test_piped_messages_and_commands(folder, photo, tmp_path):
    done = chat(
        folder,
        ["Hi", f"/image {photo}", "What is this?", "/save conv.safetensors", "/quit"],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    first, second = stats_lines(done.stderr)
    assert "reused" not in first and "reused)" in second  # turn 1 came from the cache
    assert (tmp_path / "conv.safetensors").is_file()
    assert "Traceback" not in done.stderr


def test_a_saved_chat_resumes_identically_in_a_new_process(folder, photo, tmp_path):
    whole = chat(
        folder, [f"/image {photo}", "Describe it.", "/save c.safetensors", "Go on."], cwd=tmp_path
    )
    resumed = chat(folder, ["/load c.safetensors", "Go on."], cwd=tmp_path)
    assert whole.returncode == resumed.returncode == 0, whole.stderr + resumed.stderr
    assert "(loaded c.safetensors: 1 turn(s)" in resumed.stderr
    assert whole.stdout.endswith(resumed.stdout) and resumed.stdout.strip()
    reused = [
        line.split(",")[0]
        for line in (stats_lines(whole.stderr)[-1], stats_lines(resumed.stderr)[-1])
    ]
    assert reused[0] == reused[1]  # the same prompt, the same tokens reused


def test_mistakes_are_one_line_and_the_chat_goes_on(folder, tmp_path):
    (tmp_path / "taken.safetensors").write_text("mine")
    done = chat(
        folder,
        ["/frobnicate", "/image missing.png", "/save taken.safetensors", "/load nothing", "Hi"],
        cwd=tmp_path,
    )
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 4, done.stderr
    assert "unknown command /frobnicate" in errors[0] and "not found" in errors[1]
    assert "exists; /save to a new file name" in errors[2]
    assert (tmp_path / "taken.safetensors").read_text() == "mine"
    assert len(stats_lines(done.stderr)) == 1  # and the message after them was answered
    assert done.returncode == 1  # a script with failed lines says so
    assert "Traceback" not in done.stderr


def test_context_limit_refuses_or_drops_old_turns(folder):
    story = "Tell me a story about the sea."
    refused = chat(folder, [story] * 3, "--max-kv-size", "150", "-m", "30")
    assert "at most 150 fit" in refused.stderr and "--drop-old-turns" in refused.stderr
    assert len(stats_lines(refused.stderr)) == 1 and refused.returncode == 1
    dropped = chat(folder, [story] * 3, "--max-kv-size", "150", "-m", "30", "--drop-old-turns")
    assert dropped.returncode == 0, dropped.stderr
    assert len(stats_lines(dropped.stderr)) == 3


class Terminal:
    """The chat in a real pseudo-terminal, as its controlling terminal (so Ctrl-C is a signal):
    typed keys in, the screen's bytes out."""

    def __init__(self, command: list[str]):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: a new session on the terminal
            os.environ["TERM"] = "xterm"
            # As a terminal's shell starts programs: a test run in the background of a
            # non-interactive shell inherits SIGINT ignored, and Ctrl-C would do nothing.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execvp(command[0], command)
        self.screen = b""

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.screen:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} on screen: {self.screen[-500:]!r}")
            if not self._drain(0.2):
                break

    def _drain(self, wait: float) -> bool:
        """Read what the terminal shows within `wait` seconds; False once it is closed."""
        ready, _, _ = select.select([self.fd], [], [], wait)
        if ready:
            try:
                self.screen += os.read(self.fd, 65536)
            except OSError:  # the child closed the terminal
                return False
        return True

    def close(self) -> int:
        """Wait for the chat to end; its exit status."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            self._drain(0.1)  # keep reading, so the chat never blocks on a full terminal
        raise AssertionError("the chat did not exit")

    def kill(self) -> None:
        try:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def test_a_real_terminal_ctrl_c_and_history(folder):
    command = [sys.executable, "-m", "mimo_mlx", "chat", "--model", str(folder), "--temp", "0"]
    terminal = Terminal([*command, "-m", "3000"])
    try:
        terminal.wait_for("> ")
        terminal.type("Tell me a story.\r")
        time.sleep(1.0)  # mid-answer: 3000 tokens take longer than that
        terminal.type("\x03")  # Ctrl-C stops the answer ...
        terminal.wait_for("[stopped]")
        terminal.wait_for("> ")
        terminal.type("/help\r")  # ... and the chat goes on
        terminal.wait_for("/reset")
        terminal.screen = b""
        terminal.type("\x1b[A")  # arrow up: readline brings the last line back
        terminal.wait_for("/help")
        terminal.type("\r")
        terminal.wait_for("/reset")
        terminal.type("/quit\r")
        assert terminal.close() == 0
    finally:
        terminal.kill()
