"""The server under pressure: clients that go away, a full queue, the time limit; and the media
it reads only when told to (fetched URLs, local files, a video).

The server runs the tiny model with a 64k context so one answer can last several seconds, one
request at a time with one place in the queue, a 3-second time limit, and fetching and local files
allowed.
"""

from __future__ import annotations

import http.server
import json
import signal
import socket
import threading
import time

import httpx2
import numpy as np
import openai
import pytest
from PIL import Image
from server_process import ServerProcess, data_url, long_context_folder, wait_for
from test_generate import MAX_PIXELS

TIME_LIMIT_S = 3.0
LONG = 60_000  # tokens: far more than the time limit lets through
STORY = [{"role": "user", "content": "Tell me a long story."}]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The folder the server may read local files from."""
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="module")
def photo(shared):
    path = shared / "photo.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(path)
    return path


class _Files(http.server.BaseHTTPRequestHandler):
    photo: bytes = b""

    def do_GET(self):  # noqa: N802
        if self.path == "/slow.png":
            time.sleep(3)
        body = self.photo if self.path == "/photo.png" else b"\x89PNG" + b"x" * 300_000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:  # the server hung up on a body too large to fetch
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def files(photo):
    handler = type("Files", (_Files,), {"photo": photo.read_bytes()})
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{web.server_address[1]}"
    web.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return long_context_folder(tmp_path_factory.mktemp("tiny-long"))


@pytest.fixture(scope="module")
def server(folder, shared, tmp_path_factory):
    # One request at a time: the queue's limit is what these tests press on (test_batching's
    # server presses on it with a batch).
    flags = ["--max-batch", "1", "--queue-size", "1", "--request-timeout", str(TIME_LIMIT_S)]
    flags += ["--max-pixels", str(MAX_PIXELS), "--allow-fetch", "--allow-fetch-private"]
    flags += ["--fetch-max-bytes"]
    flags += ["100KiB", "--fetch-timeout", "1", "--video-min-pixels", "3136"]
    flags += ["--allow-local-files", str(shared)]
    flags += ["--video-max-pixels", "3136", "--max-frames", "4"]
    flags += ["--video-max-tokens", "6"]  # 4 frames of 56x56 take 8: 2 are kept, and said so
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    with ServerProcess(folder, log, *flags) as running:
        yield running


def open_stream(server, http: httpx2.Client, max_tokens: int = LONG):
    body = {"messages": STORY, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    return http.stream("POST", server.url + "/v1/chat/completions", json=body)


def send_only(server, body: dict) -> socket.socket:
    """Send a request and read nothing back (its answer would wait for its turn in the queue)."""
    data = json.dumps(body).encode()
    connection = socket.create_connection(("127.0.0.1", server.port))
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
    head += f"application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    connection.sendall(head.encode() + data)
    return connection


def short_answer(server) -> float:
    """Seconds a four-token request takes."""
    started = time.monotonic()
    reply = server.client(timeout=60).chat.completions.create(
        model=server.health()["model"], messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
    return time.monotonic() - started


def test_the_time_limit_ends_a_stream_with_length(server):
    started = time.monotonic()
    stream = server.client(timeout=60).chat.completions.create(
        model=server.health()["model"],
        messages=STORY,
        max_tokens=LONG,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    elapsed = time.monotonic() - started
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["length"]
    assert 0 < chunks[-1].usage.completion_tokens < LONG
    assert TIME_LIMIT_S - 0.5 < elapsed < TIME_LIMIT_S + 5  # ended by the limit, promptly
    assert "(time limit)" in server.log()


def read_a_little_then_leave(server) -> None:
    with httpx2.Client(timeout=30) as http, open_stream(server, http) as response:
        assert response.status_code == 200
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data: ")
            if events == 5:
                return


def ask_then_give_up(server) -> None:
    body = {"messages": STORY, "max_tokens": LONG, "temperature": 0}
    with pytest.raises(httpx2.ReadTimeout):  # the client stops waiting and hangs up
        httpx2.post(server.url + "/v1/chat/completions", json=body, timeout=0.5)


@pytest.mark.parametrize("leave", [read_a_little_then_leave, ask_then_give_up])
def test_a_client_that_goes_away_stops_its_generation(server, leave):
    before = server.health()["requests"]["cancelled"]
    started = time.monotonic()
    leave(server)
    # The connection is closed: the server notices, stops generating and serves the next one
    # long before the time limit would have ended the abandoned answer.
    wait_for(lambda: server.health()["requests"]["cancelled"] == before + 1, timeout=2)
    assert short_answer(server) < 2
    assert time.monotonic() - started < TIME_LIMIT_S
    stopped = [line for line in server.log().splitlines() if "the client went away" in line]
    tokens = int(stopped[-1].split("stopped after ")[1].split()[0])
    assert 0 < tokens < LONG


def test_a_full_queue_is_refused_at_once(server):
    before = server.health()["requests"]
    with httpx2.Client(timeout=30) as first:
        with open_stream(server, first) as running:
            assert running.status_code == 200  # headers come after its first token
            waiting = send_only(server, {"messages": STORY, "max_tokens": LONG, "stream": True})
            wait_for(lambda: server.health()["queue"]["waiting"] == 1, timeout=5)
            started = time.monotonic()
            refused = httpx2.post(
                server.url + "/v1/chat/completions", json={"messages": STORY}, timeout=30
            )
            assert time.monotonic() - started < 1.0
            waiting.close()
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "server_overloaded"
    idle = {"waiting": 0, "reading": 0, "running": 0, "capacity": 1, "max_batch": 1}
    wait_for(lambda: server.health()["queue"] == idle)
    after = server.health()["requests"]
    assert after["rejected"] == before["rejected"] + 1
    assert after["cancelled"] == before["cancelled"] + 2  # the waiting one never ran


def test_fetched_and_local_images_answer_as_a_data_url_does(server, photo, files):
    def answer(url: str) -> str:
        part = {"type": "image_url", "image_url": {"url": url}}
        reply = server.client(timeout=60).chat.completions.create(
            model=server.health()["model"],
            messages=[{"role": "user", "content": [part, {"type": "text", "text": "What?"}]}],
            max_tokens=12,
            temperature=0,
        )
        return reply.choices[0].message.content

    expected = answer(data_url(photo))
    assert answer(files + "/photo.png") == expected
    assert answer(str(photo)) == expected and answer(f"file://{photo}") == expected


@pytest.mark.parametrize(
    "path, code", [("/big.png", "media_too_large"), ("/slow.png", "fetch_failed")]
)
def test_fetching_is_bounded(server, files, path, code):
    part = {"type": "image_url", "image_url": {"url": files + path}}
    started = time.monotonic()
    with pytest.raises(openai.BadRequestError) as caught:
        server.client(timeout=60).chat.completions.create(
            model=server.health()["model"], messages=[{"role": "user", "content": [part]}]
        )
    assert caught.value.body["code"] == code and time.monotonic() - started < 2.5


def test_a_video_of_frames_on_disk(server, shared):
    rng = np.random.default_rng(2)
    frames = shared / "frames"
    frames.mkdir()
    for i in range(4):
        frame = rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)
        Image.fromarray(frame).save(frames / f"frame{i:02d}.png")
    part = {"type": "video_url", "video_url": {"url": "frames"}}  # relative to the folder
    reply = server.client(timeout=60).chat.completions.create(
        model=server.health()["model"],
        messages=[{"role": "user", "content": [part, {"type": "text", "text": "What happens?"}]}],
        max_tokens=4,
    )
    text_only = server.client(timeout=60).chat.completions.create(
        model=server.health()["model"],
        messages=[{"role": "user", "content": "What happens?"}],
        max_tokens=4,
    )
    assert reply.usage.prompt_tokens > text_only.usage.prompt_tokens + 2  # the frames' tokens
    # What the token budget did is said to the client (and in the log), naming the video as
    # the request named it; an answer it did not touch has no notices.
    notice = (
        "frames: 4 frames at 56x56 would take 8 tokens, more than video_max_tokens (6): "
        "2 of the 4 frames kept, evenly spaced"
    )
    assert reply.notices == [notice] and "notices" not in text_only.model_extra
    stream = server.client(timeout=60).chat.completions.create(
        model=server.health()["model"],
        messages=[{"role": "user", "content": [part, {"type": "text", "text": "Go on."}]}],
        max_tokens=4,
        stream=True,
    )
    chunks = list(stream)
    assert chunks[0].notices == [notice]
    assert all("notices" not in chunk.model_extra for chunk in chunks[1:])
    assert notice in server.log()


def test_ctrl_c_ends_the_requests_and_the_server_promptly(folder, tmp_path):
    with ServerProcess(folder, tmp_path / "server.log") as own:
        with httpx2.Client(timeout=30) as http, open_stream(own, http) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            own.process.send_signal(signal.SIGINT)
            started = time.monotonic()
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "shutting_down"  # an error event, then [DONE]
        assert own.process.wait(10) == 130  # the command's exit status for Ctrl-C
        assert time.monotonic() - started < 5
