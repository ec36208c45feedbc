"""`mimo-mlx serve` as clients use it: the official openai client against a server subprocess.

The server runs the tiny test model on 127.0.0.1 with an API key. Greedy answers are compared with
`mimo-mlx generate` and the library's `generate` for the same request, alone and with several
clients at once; a few hundred randomized bad requests must each get an OpenAI-style error and
leave the server answering.
"""

from __future__ import annotations

import base64
import io
import json
import random
import re
import subprocess
import sys
import threading

import httpx2
import numpy as np
import openai
import pytest
from click.testing import CliRunner
from PIL import Image
from server_process import ServerProcess, check_turn_two_reuses_turn_one, image_question
from test_generate import MAX_PIXELS, write_model_folder

import mimo_mlx
from mimo_mlx.cli.main import main
from mimo_mlx.cli.serve import ByteSize
from mimo_mlx.inputs.template import split_thinking

KEY = "test-key"
PROMPT = "What is in this picture?"
TOKENS = 24


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_model_folder(tmp_path_factory.mktemp("tiny-serve"), seed=21)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    flags = ["--api-key", KEY, "--model-name", "tiny", "--max-pixels", str(MAX_PIXELS)]
    with ServerProcess(folder, log, *flags, "--max-body-bytes", "1MiB") as running:
        yield running


@pytest.fixture(scope="module")
def local(folder):
    return mimo_mlx.load(folder)


def client(server, **kwargs) -> openai.OpenAI:
    return server.client(api_key=KEY, **kwargs)


def solo(local, prompt: str, images=(), max_tokens=TOKENS) -> tuple[str, str]:
    """(reasoning, answer) of the library's greedy `generate`, alone in this process."""
    result = mimo_mlx.generate(
        *local, prompt, images=list(images), max_tokens=max_tokens, temp=0.0, max_pixels=MAX_PIXELS
    )
    return result.thinking, result.answer


def reasoning_of(message) -> str:
    return (message.model_extra or {}).get("reasoning_content") or ""


# ---------------------------------------------------------------- answers


def test_an_answer_with_an_image_equals_mimo_mlx_generate(server, folder, photo):
    reply = client(server).chat.completions.create(
        model="tiny", messages=image_question(photo, PROMPT), max_tokens=TOKENS, temperature=0
    )
    args = ["generate", "--model", folder, "--image", photo, "--prompt", PROMPT]
    args += ["--max-tokens", TOKENS, "--temp", 0, "--max-pixels", MAX_PIXELS]
    cli = CliRunner().invoke(main, [str(a) for a in args])
    assert cli.exit_code == 0, cli.output
    thinking, answer = split_thinking(cli.stdout)
    message = reply.choices[0].message
    assert message.content == answer and reasoning_of(message) == thinking
    assert message.content and reply.choices[0].finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.completion_tokens <= TOKENS and usage.total_tokens == (
        usage.prompt_tokens + usage.completion_tokens
    )
    timings = reply.model_extra["timings"]
    assert timings["predicted_n"] == usage.completion_tokens and timings["prompt_ms"] > 0
    assert timings["prompt_n"] + timings["cache_n"] == usage.prompt_tokens


def test_a_streamed_answer_equals_the_whole_one(server, photo, local):
    stream = client(server).chat.completions.create(
        model="tiny",
        messages=image_question(photo, PROMPT),
        max_tokens=TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        logprobs=True,
        top_logprobs=2,
    )
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(reasoning_of(c.choices[0].delta) for c in chunks if c.choices)
    assert (reasoning, content) == solo(local, PROMPT, [Image.open(photo)])
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and "timings" in finish[0].model_extra
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    logprobs = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    stopped = finish[0].choices[0].finish_reason == "stop"  # the end token has no entry
    assert len(logprobs) == chunks[-1].usage.completion_tokens - stopped
    assert all(
        len(e.top_logprobs) == 2 and e.logprob <= e.top_logprobs[0].logprob + 1e-6 for e in logprobs
    )


def test_logprob_bytes_are_each_tokens_real_bytes(server, photo, local):
    """A token may hold part of a character (its text alone is U+FFFD): its bytes are the real
    ones, so joining them rebuilds the answer."""
    reply = client(server).chat.completions.create(
        model="tiny",
        messages=image_question(photo, PROMPT),
        max_tokens=TOKENS,
        temperature=0,
        logprobs=True,
        top_logprobs=1,
    )
    result = mimo_mlx.generate(
        *local,
        PROMPT,
        images=[Image.open(photo)],
        max_tokens=TOKENS,
        temp=0.0,
        max_pixels=MAX_PIXELS,
    )
    tokenizer = local[1].tokenizer
    answer = [t for t in result.tokens if t not in tokenizer.eos_token_ids]
    entries = reply.choices[0].logprobs.content
    assert [e.bytes for e in entries] == [list(tokenizer.token_bytes(t)) for t in answer]
    assert [e.top_logprobs[0].bytes for e in entries] == [e.bytes for e in entries]  # greedy
    text = b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace")
    assert text == tokenizer.decode(answer)
    assert all(e.bytes != list("\ufffd".encode()) for e in entries if e.token == "\ufffd")


def test_turn_two_reuses_turn_ones_tokens(server, photo):
    check_turn_two_reuses_turn_one(client(server), photo)


def test_concurrent_clients_get_their_solo_answers(server, local):
    prompts = ["Tell me a story.", "Count to ten.", "Hello there", "What is this?"]
    expected = [solo(local, p, max_tokens=16) for p in prompts]
    got: dict[int, tuple[str, str]] = {}
    barrier = threading.Barrier(len(prompts))

    def ask(index: int) -> None:
        api = client(server, timeout=60)
        messages = [{"role": "user", "content": prompts[index]}]
        barrier.wait()
        if index % 2:
            stream = api.chat.completions.create(
                model="tiny", messages=messages, max_tokens=16, temperature=0, stream=True
            )
            chunks = [c.choices[0].delta for c in stream if c.choices]
            got[index] = (
                "".join(reasoning_of(d) for d in chunks),
                "".join(d.content or "" for d in chunks),
            )
        else:
            reply = api.chat.completions.create(
                model="tiny", messages=messages, max_tokens=16, temperature=0
            )
            got[index] = (reasoning_of(reply.choices[0].message), reply.choices[0].message.content)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [got.get(i) for i in range(len(prompts))] == expected


def test_stop_sequences_end_the_answer(server, local):
    _, answer = solo(local, "Tell me a story.", max_tokens=16)
    stop = answer[3:6]
    reply = client(server).chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=16,
        temperature=0,
        stop=[stop],
    )
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == answer[: answer.index(stop)].strip()


# ---------------------------------------------------------------- the API around the answers


def test_the_api_key_guards_everything_but_health(server):
    with pytest.raises(openai.AuthenticationError) as caught:
        server.client(api_key="wrong").models.list()
    assert caught.value.body["code"] == "invalid_api_key"
    anonymous = httpx2.post(server.url + "/v1/chat/completions", json={"messages": []})
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == "Bearer"
    assert httpx2.get(server.url + "/health").json()["status"] == "ok"


def test_models_are_listed(server, folder):
    """--model-name makes the model field strict: its name, the folder's and nothing else."""
    api = client(server)
    assert [m.id for m in api.models.list()] == ["tiny"]
    for name in ("tiny", folder.name, str(folder)):
        reply = api.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=1
        )
        assert reply.model == "tiny"
    assert api.models.retrieve("tiny").owned_by == "mimo-mlx"
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("gpt-4o")
    with pytest.raises(openai.NotFoundError) as caught:
        api.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.body["code"] == "model_not_found"


def test_unknown_routes_methods_and_big_bodies(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    missing = httpx2.post(server.url + "/v1/embeddings", headers=auth, json={})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert httpx2.get(server.url + "/v1/chat/completions", headers=auth).status_code == 405
    big = {"messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    too_big = httpx2.post(server.url + "/v1/chat/completions", headers=auth, json=big)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"


def test_media_the_server_was_not_allowed_to_read(server, photo):
    for url in ("http://127.0.0.1:9/photo.png", str(photo), f"file://{photo}"):
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
        with pytest.raises(openai.BadRequestError) as caught:
            client(server).chat.completions.create(model="tiny", messages=messages)
        assert caught.value.body["code"] in ("fetch_disabled", "local_files_disabled")


def test_a_video_that_does_not_decode_names_the_field_not_the_temporary_file(server):
    part = {"type": "video_url", "video_url": {"url": GARBAGE_VIDEO}}
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            client(server).chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": [part]}], stream=stream
            )
        message = caught.value.body["message"]
        assert "messages[0].content[0].video_url.url" in message
        assert not LEAKS.search(message), message


def test_a_prompt_past_the_context_is_a_400(server):
    words = "hello world " * 3000
    with pytest.raises(openai.BadRequestError) as caught:
        client(server).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": words}], max_tokens=4
        )
    assert caught.value.body["code"] == "context_length_exceeded"
    assert "4096" in caught.value.body["message"]


# ---------------------------------------------------------------- bad requests


def _png(size, mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


GARBAGE_VIDEO = "data:video/mp4;base64," + base64.b64encode(b"\x00" * 64).decode()
BAD_VALUES = {
    "temperature": ["hot", -1, 2.5, True, [], {}],
    "top_p": [-0.5, 1.5, "x", False],
    "top_k": [-2, 1.5, "5"],
    "min_p": [2, -1, "x"],
    "seed": [-1, 1.5, "s", 2**64],
    "max_tokens": [0, -10, 10**12, 3.5, "ten", True],
    "max_completion_tokens": [0, -1, 10**9],
    "repetition_penalty": [0, -1, 100, "x"],
    "stop": [5, [1, 2], ["a"] * 5, [""], {"a": 1}, "\ud800", ["ok", "x\udfff"]],
    "stream": ["yes", 1, []],
    "logprobs": ["true", 1],
    "top_logprobs": [-1, 50, "3"],
    "min_pixels": [0, -5, 10**12, "x"],
    "max_pixels": [0, -5, 10**12, 1.5],
    "n": [2, 0, 10],
    "model": ["gpt-4", 5, "", "tiny\udc00"],
    "user": ["\ud83d"],  # a lone surrogate, even in a field the server ignores
    "stream_options": ["x", 5, {"include_usage": True}],
    "tools": [
        [{"type": "function", "function": {"name": "no spaces"}}],
        [{"type": "function", "function": {"name": "f", "parameters": 3}}],
        [{"type": "function"}],
        "f",
    ],
    "tool_choice": ["required", {"type": "function", "function": {"name": "f"}}, 5],
    "presence_penalty": [1.0, -1.5, "x"],
    "response_format": [
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"uniqueItems": True}}},
        {"type": "yaml"},
        "json",
    ],
    "chat_template_kwargs": ["x", 5, {"enable_thinking": "no"}],
    "messages": [
        None,
        [],
        "hi",
        {},
        [1],
        [{"role": "x", "content": "y"}],
        [{"role": "user"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "audio"}]}],
        [{"role": "user", "content": [{"type": "text"}]}],
        [{"role": "tool", "content": "x"}],
        [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "user", "content": "half a smile: \ud83d"}],
        [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/\ud800"}}]}],
        [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": GARBAGE_VIDEO}}]}],
    ],
}
# What no error message may show: an object's repr (a memory address), a temporary file, the
# command line's wording for its own flags.
LEAKS = re.compile(r" at 0x[0-9a-fA-F]+|mimo-mlx-\w+\.|Traceback|--image\b|--video\b")


def _bad_images(rng: random.Random) -> list[str]:
    valid = _png((64, 64))
    huge = _png((20000, 20000), mode="1")
    encode = lambda data: "data:image/png;base64," + base64.b64encode(data).decode()  # noqa: E731
    return [
        encode(rng.randbytes(rng.randint(1, 2000))),
        encode(valid[: rng.randint(10, len(valid) - 10)]),
        encode(_png((10, 10))),
        encode(_png((28, 6000))),
        encode(huge),
        "data:image/png;base64,%%%",
        "data:image/png,plain",
        "http://127.0.0.1:9/x.png",
        "/etc/hostname",
        "gopher://example.com/x",
    ]


def bad_requests(rng: random.Random, count: int):
    """(method, path, body bytes, headers, expected status) of `count` requests, each wrong."""
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    chat = "/v1/chat/completions"
    good = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    images = _bad_images(rng)
    for _ in range(count):
        kinds = ["field", "field", "field", "image", "json", "route", "auth", "context", "access"]
        kind = rng.choices([*kinds, "big"], weights=[1] * 9 + [0.2])[0]
        body = dict(good)
        if kind == "field":
            name = rng.choice(sorted(BAD_VALUES))
            body[name] = value = rng.choice(BAD_VALUES[name])
            unknown_model = name == "model" and isinstance(value, str) and value.isascii()
            yield (
                "POST",
                chat,
                json.dumps(body).encode(),
                auth,
                404 if unknown_model and value else 400,
            )
        elif kind == "image":
            part = {"type": "image_url", "image_url": {"url": rng.choice(images)}}
            body["messages"] = [{"role": "user", "content": [part, {"type": "text", "text": "?"}]}]
            yield "POST", chat, json.dumps(body).encode(), auth, 400
        elif kind == "json":
            text = json.dumps(body).encode()
            yield (
                "POST",
                chat,
                rng.choice(
                    [
                        text[: rng.randint(0, len(text) - 1)],
                        rng.randbytes(rng.randint(0, 300)).replace(b"{", b"").replace(b"[", b""),
                        b"[" * 100_000,
                        b'{"messages": NaN}',
                        b"",
                        b"[]",
                        b"42",
                        b"null",
                    ]
                ),
                auth,
                400,
            )
        elif kind == "route":
            yield rng.choice(
                [
                    ("GET", chat, b"", auth, 405),
                    ("POST", "/v1/completions", text_of(good), auth, 400),
                    ("POST", "/v1/completions", text_of({"prompt": [1, 2]}), auth, 400),
                    ("DELETE", "/v1/models", b"", auth, 405),
                    ("GET", "/" + "".join(rng.choices("abcxyz/.", k=12)), b"", auth, 404),
                    ("POST", "/health", b"", auth, 405),
                ]
            )
        elif kind == "auth":
            header = rng.choice(
                [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic eA=="}]
            )
            yield "POST", chat, text_of(good), {**header, "Content-Type": "application/json"}, 401
        elif kind == "context":
            body["messages"] = [{"role": "user", "content": "hello world " * 3000}]
            yield "POST", chat, json.dumps(body).encode(), auth, 400
        elif kind == "access":  # what web pages send: refused before the key is even looked at
            yield rng.choice(
                [
                    ("POST", chat, text_of(good), {**auth, "Origin": "http://evil.example"}, 403),
                    ("POST", chat, text_of(good), {**auth, "Host": "evil.example"}, 403),
                    ("GET", "/v1/models", b"", {**auth, "Host": "evil.example:80"}, 403),
                    ("POST", chat, text_of(good), {**auth, "Content-Type": "text/plain"}, 415),
                    ("OPTIONS", chat, b"", {"Origin": "http://evil.example"}, 403),
                ]
            )
        else:  # past --max-body-bytes
            body["messages"] = [{"role": "user", "content": "x" * (1 << 20)}]
            yield "POST", chat, json.dumps(body).encode(), auth, 413


def text_of(body: dict) -> bytes:
    return json.dumps(body).encode()


def test_hundreds_of_bad_requests_then_a_good_one(server, local):
    rng = random.Random(1234)
    with httpx2.Client(base_url=server.url, timeout=30) as http:
        for method, path, body, headers, status in bad_requests(rng, 300):
            response = http.request(method, path, content=body, headers=headers)
            assert response.status_code == status, (path, body[:200], response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
            assert not LEAKS.search(error["message"]), error["message"]
            assert "Traceback" not in response.text
    assert server.process.poll() is None
    assert server.health()["requests"]["failed"] == 0  # no internal error among them
    reply = client(server).chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Count to ten."}],
        max_tokens=16,
        temperature=0,
    )
    message = reply.choices[0].message
    assert (reasoning_of(message), message.content) == solo(local, "Count to ten.", max_tokens=16)


# ---------------------------------------------------------------- the command


def test_serve_without_its_extra_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "starlette", None)  # None in sys.modules: not installed
    result = CliRunner().invoke(main, ["serve", "--model", "anything"])
    assert result.exit_code == 1
    assert (
        result.output.strip() == 'error: the server needs its extra: pip install "mimo-mlx[serve]"'
    )


def test_serve_help_imports_neither_mlx_nor_the_server():
    script = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from mimo_mlx.cli.main import main\n"
        "result = CliRunner().invoke(main, ['serve', '--help'])\n"
        "assert result.exit_code == 0 and '--api-key' in result.output, result.output\n"
        "print(sorted(m for m in ('mlx.core', 'starlette', 'uvicorn') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "text, size", [("2GiB", 2 << 30), ("512MB", 512 << 20), ("64k", 64 << 10), ("1000", 1000)]
)
def test_sizes_on_the_command_line(text, size):
    assert ByteSize().convert(text, None, None) == size


def test_a_size_that_is_not_one_is_one_line():
    result = CliRunner().invoke(main, ["serve", "--cache-bytes", "lots"])
    assert result.exit_code == 1
    assert (
        result.output == "error: --cache-bytes: 'lots' is not a size (e.g. 2GiB, 512MB, 1048576)\n"
    )
