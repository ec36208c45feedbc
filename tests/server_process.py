"""`mimo-mlx serve` as a subprocess on a free 127.0.0.1 port, for the server's tests."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
from test_generate import write_model_folder

START_TIMEOUT_S = 120  # loading MLX and the tiny model on a busy two-core machine


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def data_url(path: Path) -> str:
    kind = "jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else path.suffix.lower()[1:]
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def image_question(photo: Path, text: str) -> list[dict]:
    """One user message: the photo as a data URL, then `text`."""
    part = {"type": "image_url", "image_url": {"url": data_url(photo)}}
    return [{"role": "user", "content": [part, {"type": "text", "text": text}]}]


def check_turn_two_reuses_turn_one(api, photo: Path) -> None:
    """Two turns about `photo` through the openai client `api`: the second's cached tokens
    cover the image and turn one, and the server's timings say the same."""
    first_turn = image_question(photo, "Describe the colours.")
    first = api.chat.completions.create(
        model="tiny", messages=first_turn, max_tokens=8, temperature=0
    )
    history = [*first_turn, {"role": "assistant", "content": first.choices[0].message.content}]
    second = api.chat.completions.create(
        model="tiny",
        messages=[*history, {"role": "user", "content": "And the shapes?"}],
        max_tokens=8,
        temperature=0,
    )
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens  # the image and turn 1 were not computed again
    assert second.model_extra["timings"]["cache_n"] == cached


def long_context_folder(folder: Path, context: int = 65536) -> Path:
    """The tiny test model with a longer context, for generations that last seconds."""
    write_model_folder(folder, seed=21)
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config", config)
    text["max_position_embeddings"] = context
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def wait_for(condition, timeout: float = 10.0, poll: float = 0.02) -> None:
    """Until `condition()` holds; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(poll)


class ServerProcess:
    """A running server: `url`, `log()`, `health()`; a context manager that stops it."""

    def __init__(self, folder: Path, log_path: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "mimo_mlx", "serve", "--model", str(folder)]
        command += ["--port", str(self.port), *args]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._wait_until_up()

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}):\n{self.log()}")
            try:
                if httpx2.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx2.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not come up in {START_TIMEOUT_S} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def health(self) -> dict:
        return httpx2.get(self.url + "/health", timeout=10).json()

    def client(self, api_key: str = "none", **options):
        """The real openai client for this server, without retries (a failure shows at once)."""
        import openai  # noqa: PLC0415  (the test extra installs it)

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, **options)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
