"""`mimo-mlx serve` batching concurrent requests (--max-batch): they share the decode loop, each
gets its solo answer, a client that leaves frees its place at once without changing anyone's
tokens, the queue holds what the batch cannot, and conversations are still reused.

The server runs the tiny model with a 64k context (answers can last seconds), three requests at
a time and one place in the queue; answers are compared with the library's `generate`.
"""

from __future__ import annotations

import threading
import time

import httpx2
import pytest
from server_process import (
    ServerProcess,
    check_turn_two_reuses_turn_one,
    image_question,
    long_context_folder,
    wait_for,
)
from test_generate import MAX_PIXELS, sample_images

import mimo_mlx

STORY = [{"role": "user", "content": "Tell me a long story."}]
LONG = 60_000  # tokens: far more than any of these tests reads


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return long_context_folder(tmp_path_factory.mktemp("tiny-batching"))


@pytest.fixture(scope="module")
def local(folder):
    return mimo_mlx.load(folder)


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    flags = ["--max-batch", "3", "--queue-size", "1", "--max-pixels", str(MAX_PIXELS)]
    with ServerProcess(folder, log, *flags) as running:
        yield running


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    return sample_images(tmp_path_factory.mktemp("batching-images"))[0]


def streamed_text(server, messages, **options) -> str:
    stream = server.client(timeout=120).chat.completions.create(
        model="tiny", messages=messages, stream=True, **options
    )
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def solo_answer(local, messages, **options) -> str:
    """The library's answer to the same request (the server's chat template, alone)."""
    model, processor = local
    inputs = processor.prepare_messages(messages, max_pixels=MAX_PIXELS)
    return mimo_mlx.generate(model, processor, "", inputs=inputs, **options).answer


def long_stream(server, http: httpx2.Client):
    body = {"messages": STORY, "max_tokens": LONG, "temperature": 0, "stream": True}
    return http.stream("POST", server.url + "/v1/chat/completions", json=body)


ANSWER = 160  # tokens per answer in the concurrent test


def test_concurrent_requests_decode_together_with_their_solo_answers(server, local, photo):
    """Three requests at once (an image, greedy text, seeded sampling) run in one batch, and
    each answer is the one the library gives the request alone. The answers are long enough
    (ANSWER tokens) that the watcher, polling /health, sees the three run together however fast
    the tiny model decodes."""
    requests = [
        (image_question(photo, "What is in this picture?"), dict(max_tokens=ANSWER, temperature=0)),
        ([{"role": "user", "content": "Count to ten."}], dict(max_tokens=ANSWER, temperature=0)),
        (
            [{"role": "user", "content": "Hello there"}],
            dict(max_tokens=ANSWER, temperature=1.0, top_p=0.9, seed=7),
        ),
    ]
    expected = []
    for messages, options in requests:
        library = {"temp" if k == "temperature" else k: v for k, v in options.items()}
        expected.append(solo_answer(local, messages, **library))
    got, most = {}, [0]
    barrier = threading.Barrier(len(requests) + 1)

    def ask(index: int) -> None:
        messages, options = requests[index]
        barrier.wait()
        got[index] = streamed_text(server, messages, **options)

    def watch() -> None:
        barrier.wait()
        while any(thread.is_alive() for thread in threads[:-1]):
            most[0] = max(most[0], server.health()["queue"]["running"])
            time.sleep(0.01)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    threads.append(threading.Thread(target=watch))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [got.get(i) for i in range(len(requests))] == expected
    assert most[0] == 3  # they really ran together


def test_a_client_that_leaves_frees_its_place_and_changes_no_one_else(server, local):
    """Two long streams run; one client hangs up. Its place is free within moments (a waiting
    request starts), and the other's answer is its solo answer, token for token."""
    messages = [{"role": "user", "content": "Count to ten."}]
    expected = solo_answer(local, messages, max_tokens=150)
    before = server.health()["requests"]["cancelled"]
    kept: dict[str, str] = {}

    def keep_reading() -> None:
        kept["text"] = streamed_text(server, messages, max_tokens=150, temperature=0)

    reader = threading.Thread(target=keep_reading)
    with httpx2.Client(timeout=60) as http, long_stream(server, http) as leaving:
        lines = leaving.iter_lines()
        assert next(lines).startswith("data: ")
        reader.start()
        wait_for(lambda: server.health()["queue"]["running"] == 2)
        for _ in range(5):
            next(lines)
    left = time.monotonic()  # the connection is closed here
    wait_for(lambda: server.health()["requests"]["cancelled"] == before + 1, timeout=5)
    assert time.monotonic() - left < 2.0
    assert server.health()["queue"]["running"] <= 1
    reader.join(120)
    assert kept["text"] == expected


def test_the_queue_holds_what_the_batch_cannot(server):
    """Three run, one waits, the fifth is refused at once (--max-batch 3, --queue-size 1)."""
    before = server.health()["requests"]
    with httpx2.Client(timeout=60) as http:
        streams = [long_stream(server, http) for _ in range(4)]
        opened = []
        for stream in streams[:3]:
            opened.append(stream.__enter__())
            assert opened[-1].status_code == 200
        waiting = threading.Thread(target=lambda: streams[3].__enter__(), daemon=True)
        waiting.start()
        wait_for(lambda: server.health()["queue"]["waiting"] == 1)
        assert server.health()["queue"]["running"] == 3
        started = time.monotonic()
        refused = httpx2.post(server.url + "/v1/chat/completions", json={"messages": STORY})
        assert time.monotonic() - started < 1.0
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "server_overloaded"
        opened[0].close()  # a place frees: the waiting one runs
        wait_for(lambda: server.health()["queue"]["waiting"] == 0)
        assert server.health()["queue"]["running"] == 3
        for response in opened[1:]:
            response.close()
        waiting.join(30)
        streams[3].__exit__(None, None, None)
    idle = {"waiting": 0, "reading": 0, "running": 0, "capacity": 1, "max_batch": 3}
    wait_for(lambda: server.health()["queue"] == idle)
    after = server.health()["requests"]
    assert after["rejected"] == before["rejected"] + 1
    assert after["cancelled"] == before["cancelled"] + 4


def test_turn_two_reuses_turn_one_while_others_run(server, photo):
    """A conversation answered in a batch goes back to the pool with its answer: its next turn
    reuses the image and turn one, though other requests ran meanwhile."""
    api = server.client(timeout=120)
    with httpx2.Client(timeout=60) as http, long_stream(server, http) as other:
        assert other.status_code == 200
        check_turn_two_reuses_turn_one(api, photo)
