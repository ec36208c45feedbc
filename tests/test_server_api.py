"""The server's request checking, answer streaming and media reading, without a server."""

from __future__ import annotations

import ast
import base64
import http.server
import io
import json
import random
import re
import socket
import threading
import time
from pathlib import Path

import anyio
import pytest
from PIL import Image

import mimo_mlx.serve
from mimo_mlx.generation.answer_stream import AnswerStream
from mimo_mlx.inputs.image_files import EncodedImage
from mimo_mlx.inputs.template import split_thinking
from mimo_mlx.serve.completions import parse_completion_request
from mimo_mlx.serve.media import MediaPolicy, ResolvedMedia, fetch, resolve_media
from mimo_mlx.serve.names import model_names
from mimo_mlx.serve.requests import APIError, Limits, parse_chat_request
from mimo_mlx.serve.tools import parse_chat

LIMITS = Limits(("tiny",), context=4096, max_pixels=50176)
HELLO = [{"role": "user", "content": "Hello"}]


def parse(**body):
    return parse_chat_request({"messages": HELLO, **body}, LIMITS)


def refused(body) -> APIError:
    with pytest.raises(APIError) as caught:
        parse_chat(body, LIMITS)
    assert caught.value.status == 400 and caught.value.body()["error"]["message"]
    return caught.value


CLI_FLAG = re.compile(r"--[a-z]")


def png_data_url(size=(64, 48), mode="RGB") -> str:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# ---------------------------------------------------------------- requests


def test_a_plain_request_takes_the_server_defaults():
    request = parse()
    assert request.messages == [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
    assert request.max_tokens is None and request.sampling == {} and request.prompt == {}
    assert not request.stream and request.top_logprobs is None and request.stop == ()


def test_unknown_fields_are_ignored_and_known_ones_mapped():
    request = parse(
        model="tiny",
        user="someone",
        metadata={"a": 1},
        temperature=0,
        top_p=0.5,
        top_k=-1,
        min_p=0.1,
        seed=7,
        repetition_penalty=1.1,
        max_tokens=10,
        max_completion_tokens=12,
        stop="END",
        stream=True,
        stream_options={"include_usage": True},
        logprobs=True,
        top_logprobs=3,
        min_pixels=3136,
        max_pixels=50176,
        chat_template_kwargs={"enable_thinking": False},
        n=1,
        tool_choice="none",
        response_format={"type": "text"},
    )
    assert request.sampling == {
        "temp": 0.0,
        "top_p": 0.5,
        "top_k": 0,  # vLLM's -1: disabled
        "min_p": 0.1,
        "seed": 7,
        "repetition_penalty": 1.1,
    }
    assert request.max_tokens == 12  # max_completion_tokens wins, as in OpenAI's API
    assert request.stop == ("END",) and request.stream and request.include_usage
    assert request.top_logprobs == 3
    assert request.prompt == {"min_pixels": 3136, "max_pixels": 50176, "no_think": True}


def test_media_parts_in_every_accepted_shape():
    content = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
        {"type": "image_url", "image_url": "https://example.com/a.png"},
        {"type": "image", "image": "/tmp/a.png"},
        {"type": "video_url", "video_url": {"url": "/tmp/clip.mp4"}},
        {"type": "video", "video": "/tmp/frames"},
        {"type": "text", "text": "Compare"},
    ]
    request = parse_chat_request(
        {
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": content},
            ]
        },
        LIMITS,
    )
    assert request.messages[0]["role"] == "system"
    assert [(m.kind, m.param) for m in request.media] == [
        ("image", "messages[1].content[0].image_url.url"),
        ("image", "messages[1].content[1].image_url"),
        ("image", "messages[1].content[2].image"),
        ("video", "messages[1].content[3].video_url.url"),
        ("video", "messages[1].content[4].video"),
    ]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
            "messages[0].content[0].type",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
            "messages[0].content[0].text",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0].image_url.url",
        ),
        (
            {"messages": [{"role": "assistant", "content": [{"type": "image", "image": "a.png"}]}]},
            "messages[0].content",
        ),
        ({"messages": HELLO, "model": 3}, "model"),
        ({"messages": HELLO, "model": ""}, "model"),
        ({"messages": HELLO, "temperature": "hot"}, "temperature"),
        ({"messages": HELLO, "temperature": 2.5}, "temperature"),
        ({"messages": HELLO, "temperature": True}, "temperature"),
        ({"messages": HELLO, "top_p": -0.1}, "top_p"),
        ({"messages": HELLO, "top_k": 1.5}, "top_k"),
        ({"messages": HELLO, "min_p": 3}, "min_p"),
        ({"messages": HELLO, "repetition_penalty": 0}, "repetition_penalty"),
        ({"messages": HELLO, "seed": -1}, "seed"),
        ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ({"messages": HELLO, "max_tokens": 10**9}, "max_tokens"),
        ({"messages": HELLO, "max_tokens": 10.0}, "max_tokens"),
        ({"messages": HELLO, "max_completion_tokens": -5}, "max_completion_tokens"),
        ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": HELLO, "stop": [""]}, "stop"),
        ({"messages": HELLO, "stop": 4}, "stop"),
        ({"messages": HELLO, "stream": "yes"}, "stream"),
        ({"messages": HELLO, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": HELLO, "top_logprobs": 2}, "top_logprobs"),
        ({"messages": HELLO, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": HELLO, "max_pixels": 10**9}, "max_pixels"),
        ({"messages": HELLO, "min_pixels": 0}, "min_pixels"),
        ({"messages": HELLO, "min_pixels": 5000, "max_pixels": 4000}, "min_pixels"),
        ({"messages": HELLO, "n": 2}, "n"),
        ({"messages": HELLO, "presence_penalty": 0.5}, "presence_penalty"),
        ({"messages": HELLO, "tools": [{"type": "function"}]}, "tools[0].function"),
        ({"messages": HELLO, "tools": [{"type": "x"}]}, "tools[0]"),
        ({"messages": HELLO, "tool_choice": "required"}, "tool_choice"),
        ({"messages": HELLO, "functions": [{"name": "f"}]}, "functions"),
        (
            {"messages": HELLO, "response_format": {"type": "json_schema"}},
            "response_format.json_schema",
        ),
        ({"messages": HELLO, "response_format": {"type": "xml"}}, "response_format"),
        ({"messages": HELLO, "chat_template_kwargs": []}, "chat_template_kwargs"),
    ],
)
def test_each_mistake_is_a_400_that_names_the_field(body, param):
    assert refused(body).param == param


def test_a_model_not_served_here_is_a_404_as_openai_answers_it():
    with pytest.raises(APIError) as caught:
        parse(model="gpt-4o")
    error = caught.value.body()["error"]
    assert caught.value.status == 404 and error["code"] == "model_not_found"
    assert error["param"] == "model" and "'tiny'" in error["message"]


def test_the_body_must_be_an_object():
    for body in ([], "x", 3, None):
        assert refused(body).param is None


# ---------------------------------------------------------------- the answer, streamed


def test_streamed_deltas_join_to_split_thinking_of_the_text_before_the_stop():
    atoms = [
        "<think>",
        "</think>",
        " ",
        "\n",
        "\n\n",
        "a",
        "b c",
        "STOP",
        "ST",
        "OP",
        "<th",
        "ink>",
    ]
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 12)))
        stops = rng.choice([(), ("STOP",), ("b c", "STOP"), ("</think>",)])
        opened = rng.random() < 0.3
        found = [text.find(s) for s in stops if s in text]
        expected = split_thinking(text[: min(found)] if found else text, opened)
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        answer = AnswerStream(stops, opens_thinking=opened)
        deltas = [
            answer.feed(text[a:b]) for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)
        ]
        deltas.append(answer.finish())
        got = tuple("".join(parts) for parts in zip(*deltas, strict=True))
        assert got == expected, (text, stops, opened)
        assert answer.stopped == bool(found)


def test_a_stop_sequence_split_across_pieces_is_never_shown():
    answer = AnswerStream(["<END>"])
    shown = [answer.feed(piece)[1] for piece in ["Hello <E", "N", "D> more"]]
    assert "".join(shown) == "Hello" and answer.stopped
    assert answer.feed("ignored") == ("", "") and answer.finish() == ("", "")


def test_reasoning_goes_apart_and_blocks_are_joined():
    answer = AnswerStream()
    out = [
        answer.feed(p)
        for p in ["<think>\nfirst", "</think>\n\nA", "nswer <think>second</think> end"]
    ]
    out.append(answer.finish())
    reasoning, content = ("".join(parts) for parts in zip(*out, strict=True))
    assert reasoning == "first\n\nsecond" and content == "Answer  end"


# ---------------------------------------------------------------- media


def resolve(url: str, kind="image", **policy) -> ResolvedMedia:
    request = parse_chat_request(
        {
            "messages": [
                {"role": "user", "content": [{"type": f"{kind}_url", f"{kind}_url": {"url": url}}]}
            ]
        },
        LIMITS,
    )
    return anyio.run(resolve_media, request, MediaPolicy(**policy))


def refused_media(url: str, kind="image", **policy) -> APIError:
    with pytest.raises(APIError) as caught:
        resolve(url, kind, **policy)
    assert caught.value.status == 400 and " at 0x" not in caught.value.message
    return caught.value


def test_a_data_url_is_checked_from_its_header_and_decoded_later():
    resolved = resolve(png_data_url(mode="RGBA"))
    image = resolved.messages[0]["content"][0]["image"]
    assert isinstance(image, EncodedImage) and (image.format, image.size) == ("PNG", (64, 48))
    decoded, size = image.decode(lambda h, w: (h, w))
    assert decoded.mode == "RGB" and decoded.size == size == (64, 48)
    resolved.remove()


@pytest.mark.parametrize(
    "url, code_or_words",
    [
        ("data:image/png;base64,!!!!", "not valid base64"),
        ("data:image/png,abc", "must be base64"),
        ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "invalid_image"),
        (png_data_url(size=(10, 10)), "at least 28 pixels"),
        ("https://example.com/a.png", "fetch_disabled"),
        ("/etc/hostname", "local_files_disabled"),
        ("file:///etc/hostname", "local_files_disabled"),
        ("ftp://example.com/a.png", "unsupported URL scheme"),
    ],
)
def test_bad_or_forbidden_images_are_400s(url, code_or_words):
    error = refused_media(url)
    assert error.param == "messages[0].content[0].image_url.url"
    assert code_or_words == error.code or code_or_words in error.message


def test_too_many_pixels_are_refused_from_the_header():
    big = Image.new("1", (20000, 20000))  # 400 MP, a few kB as PNG
    buffer = io.BytesIO()
    big.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    assert refused_media(url, max_image_pixels=64 * 10**6).code == "image_too_large"
    error = refused_media(png_data_url(size=(64, 48)), max_image_pixels=64 * 48 - 1)
    assert error.code == "image_too_large" and f"at most {64 * 48 - 1})" in error.message
    assert not CLI_FLAG.search(error.message)  # a client cannot pass the server's flags


def test_a_request_s_images_are_bounded_together_and_by_count():
    two = parse_chat_request(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": png_data_url()}}] * 2,
                }
            ]
        },
        LIMITS,
    )
    policy = MediaPolicy(max_request_pixels=2 * 64 * 48 - 1)
    with pytest.raises(APIError) as caught:
        anyio.run(resolve_media, two, policy)
    assert caught.value.code == "images_too_large" and str(2 * 64 * 48 - 1) in str(caught.value)
    assert not CLI_FLAG.search(caught.value.message)
    assert caught.value.param == "messages[0].content[1].image_url.url"
    assert len(anyio.run(resolve_media, two, MediaPolicy()).messages[0]["content"]) == 2
    many = {"messages": two_messages(17)}
    with pytest.raises(APIError) as caught:
        parse_chat_request(many, LIMITS)
    assert caught.value.code == "too_many_images" and "at most 16 per request" in str(caught.value)
    assert not CLI_FLAG.search(caught.value.message)


def two_messages(images: int) -> list[dict]:
    """A conversation with `images` images over two user turns (all turns count)."""
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    first = images // 2
    return [
        {"role": "user", "content": [part] * first},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [part] * (images - first)},
    ]


def test_local_files_only_inside_the_allowed_folder(tmp_path):
    root, outside = tmp_path / "shared", tmp_path / "private"
    root.mkdir()
    outside.mkdir()
    for folder in (root, outside):
        Image.new("RGB", (40, 30), "red").save(folder / "photo.png")
    (root / "link.png").symlink_to(outside / "photo.png")
    for url in (str(root / "photo.png"), "photo.png", f"file://{root}/photo.png"):
        resolved = resolve(url, local_root=root)
        assert resolved.messages[0]["content"][0]["image"].size == (40, 30)
    answers = set()
    for url in (
        str(outside / "photo.png"),  # exists, outside
        str(root / "missing.png"),  # inside, missing
        "../private/photo.png",
        str(root / "link.png"),  # a link leading out
        "/etc/hostname",
        "photo\x00.png",
    ):
        error = refused_media(url, local_root=root)
        assert error.code == "local_file_unavailable"
        answers.add(error.message)
    assert len(answers) == 1  # whether it exists is not said
    frames = root / "frames"
    frames.mkdir()
    resolved = resolve(f"file://{frames}", kind="video", local_root=root)
    assert resolved.messages[0]["content"][0]["video"] == frames


def test_a_data_url_video_is_a_temporary_file_removed_afterwards():
    url = "data:video/mp4;base64," + base64.b64encode(b"\x00" * 100).decode()
    resolved = resolve(url, kind="video")
    path = resolved.messages[0]["content"][0]["video"]
    assert path.suffix == ".mp4" and path.read_bytes() == b"\x00" * 100
    message = resolved.scrub(f"{path} could not be decoded (<av.Stream object at 0x7f00aa>)")
    assert str(path) not in message and "messages[0].content[0].video_url.url" in message
    assert "0x7f" not in message
    # A notice names a video by its file name (the video budget's): the field, here too.
    notice = resolved.scrub(f"{path.name}: 4 frames at 56x56 would take 8 tokens")
    field = "the video of 'messages[0].content[0].video_url.url'"
    assert notice == f"{field}: 4 frames at 56x56 would take 8 tokens"
    resolved.remove()
    assert not path.exists()


class _Files(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        if self.path == "/slow":
            time.sleep(3)
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", f"http://[::1]:{self.server.server_address[1]}/small")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"x" * 5000 if self.path == "/big" else b"small"
        self.send_response(404 if self.path == "/missing" else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:  # the server hung up on a body too large to fetch
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def files():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


PRIVATE_OK = MediaPolicy(
    allow_fetch=True, allow_fetch_private=True, fetch_max_bytes=1000, fetch_timeout=0.5
)


@pytest.mark.parametrize(
    "path, code",
    [("/big", "media_too_large"), ("/slow", "fetch_failed"), ("/missing", "fetch_failed")],
)
def test_fetching_is_bounded_in_size_and_time(files, path, code):
    started = time.monotonic()
    with pytest.raises(APIError) as caught:
        anyio.run(fetch, files + path, PRIVATE_OK, "url")
    assert caught.value.code == code and caught.value.status == 400
    assert time.monotonic() - started < 2.5
    assert anyio.run(fetch, files + "/small", PRIVATE_OK, "url") == b"small"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_fetch_failures_all_read_the_same(files):
    """A closed port, a slow answer and a 404 give one message: no port scanning through it."""
    closed = f"http://127.0.0.1:{free_port()}/x"
    messages = set()
    for url in (closed, files + "/slow", files + "/missing"):
        with pytest.raises(APIError) as caught:
            anyio.run(fetch, url, PRIVATE_OK, "url")
        messages.add(caught.value.message.replace(url, "URL"))
    assert len(messages) == 1


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "localhost", "[::1]", "10.0.0.1", "169.254.169.254", "192.168.1.1", "0",
     "2130706433", "[::ffff:127.0.0.1]", "100.64.0.1"],
)  # fmt: skip
def test_private_addresses_are_not_fetched_by_default(host):
    policy = MediaPolicy(allow_fetch=True, fetch_timeout=2)
    with pytest.raises(APIError) as caught:
        anyio.run(fetch, f"http://{host}:9/photo.png", policy, "url")
    assert caught.value.code == "fetch_failed" and "public address" in caught.value.message


def test_every_redirect_is_checked_and_the_checked_address_is_used(files, monkeypatch):
    """A public first hop may redirect to a private address: refused. And the connection goes
    to the address that was checked, never to a second lookup's answer."""
    port = files.rsplit(":", 1)[1]
    monkeypatch.setattr("mimo_mlx.serve.media._is_public", lambda address: address == "127.0.0.1")
    lookups = []

    async def resolver(host, port, **kwargs):
        lookups.append(host)
        found = "127.0.0.1" if host in ("127.0.0.1", "checked.test") else "::1"
        return [(socket.AF_INET6 if ":" in found else socket.AF_INET, 1, 6, "", (found, port))]

    monkeypatch.setattr("mimo_mlx.serve.media.anyio.getaddrinfo", resolver)
    policy = MediaPolicy(allow_fetch=True, fetch_timeout=2)
    assert anyio.run(fetch, f"http://checked.test:{port}/small", policy, "url") == b"small"
    with pytest.raises(APIError, match="public address"):
        anyio.run(fetch, files + "/redirect", policy, "url")
    assert lookups == ["checked.test", "127.0.0.1", "::1"]


def test_model_names_strict_or_not(tmp_path):
    folder = tmp_path / "mimo-vl-4bit"
    folder.mkdir()
    config = {"mimo_mlx": {"source": "XiaomiMiMo/MiMo-VL-7B-RL-2508"}}
    (folder / "config.json").write_text(json.dumps(config))
    names = model_names("./mimo-vl-4bit", folder, "mimo")
    assert names.id == "mimo" and names.strict
    assert set(names.names) == {
        "mimo",
        "./mimo-vl-4bit",
        "mimo-vl-4bit",
        config["mimo_mlx"]["source"],
    }
    limits = Limits(names.names, context=4096, any_model=not names.strict)
    assert parse_chat_request({"messages": HELLO, "model": "mimo-vl-4bit"}, limits).model
    with pytest.raises(APIError) as caught:
        parse_chat_request({"messages": HELLO, "model": "gpt-4o"}, limits)
    assert caught.value.status == 404
    loose = model_names("./mimo-vl-4bit", folder)
    assert loose.id == "./mimo-vl-4bit" and not loose.strict
    limits = Limits(loose.names, context=4096, any_model=True)
    assert parse_chat_request({"messages": HELLO, "model": "gpt-4o"}, limits).model == "gpt-4o"


@pytest.mark.parametrize(
    "body, param",
    [
        ({}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "logprobs": 2}, "logprobs"),
        ({"prompt": "x", "n": 2}, "n"),
        ({"prompt": "x", "temperature": 5}, "temperature"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_text_completion_mistakes_name_the_field(body, param):
    with pytest.raises(APIError) as caught:
        parse_completion_request(body, LIMITS)
    assert caught.value.status == 400 and caught.value.param == param


def test_a_text_completion_request():
    request = parse_completion_request(
        {"prompt": ["Once"], "max_tokens": 5, "temperature": 0, "stop": "\n", "echo": True},
        LIMITS,
    )
    assert (request.prompt, request.max_tokens, request.stop, request.echo) == (
        "Once",
        5,
        ("\n",),
        True,
    )
    assert request.sampling == {"temp": 0.0}


def test_no_error_a_client_gets_names_a_command_line_flag():
    """Every APIError the server builds, read from its source: the text says what the limit
    is, never which flag of the server's owner sets it (the end-to-end check is in
    test_server_security, for the errors a request can reach)."""
    found = 0
    for path in Path(mimo_mlx.serve.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            called = getattr(node, "func", None)
            if isinstance(node, ast.Call) and getattr(called, "id", None) == "APIError":
                found += 1
                for text in ast.walk(node.args[0]) if node.args else ():
                    if isinstance(text, ast.Constant) and isinstance(text.value, str):
                        assert not CLI_FLAG.search(text.value), f"{path.name}: {text.value}"
    assert found > 20
