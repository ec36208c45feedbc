"""Everything that keeps a cache, on a quantized one: conversations (prefix reuse, trimming at a
divergence), prompt lookup's verification and trim, saved conversations, the server's pool and its
byte budget, and the command line. A quantized cache stores each token on its own, so each of them
must give what a fresh quantized generation of the same tokens gives, token for token.
"""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import openai
import pytest
from click.testing import CliRunner
from PIL import Image
from server_process import ServerProcess, data_url
from test_bfloat16 import parity_prompts
from test_generate import MAX_PIXELS, sample_images, write_model_folder
from test_prompt_lookup import copy_prompt, forced
from test_server_apps import raw_greedy
from tiny_models import WIDE_HEADS

import mimo_mlx
from mimo_mlx import MimoError
from mimo_mlx.cli.main import main
from mimo_mlx.conversation.conversation import Conversation
from mimo_mlx.conversation.pool import ConversationPool
from mimo_mlx.conversation.vision_cache import VisionCache
from mimo_mlx.generation.loop import generate_step, lookup_generate_step, stream_generate
from mimo_mlx.serve.completions import parse_completion_request
from mimo_mlx.serve.requests import APIError, Limits, parse_chat_request

TOKENS = 16
EIGHT = dict(kv_bits=8)
RAW = "The quick brown fox"  # a /v1/completions prompt


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_model_folder(tmp_path_factory.mktemp("tiny-kv"), seed=72, sizes=WIDE_HEADS)


@pytest.fixture(scope="module")
def ours(folder):
    return mimo_mlx.load(folder)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    return sample_images(tmp_path_factory.mktemp("kv-images"))[0]


def pil(path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def from_scratch(ours, chat: Conversation, photo, **cache) -> list[int]:
    """The greedy answer to `chat`'s last prompt, computed afresh (one prefill) with a cache
    stored as `cache` says. A conversation keeps its images' features, not their pixels: the
    prompt is prepared again from its messages with the picture itself."""
    prompt = [
        {**m, "content": [{"type": "image", "image": pil(photo)} if p["type"] == "image" else p
                          for p in m["content"]]} if isinstance(m["content"], list) else m
        for m in chat.messages[:-1]
    ]  # fmt: skip
    inputs = chat.processor.prepare_messages(prompt, max_pixels=MAX_PIXELS)
    steps = stream_generate(*ours, "", inputs=inputs, max_tokens=TOKENS, temp=0.0, **cache)
    return [step.token for step in steps]


# ------------------------------------------------------------------ conversations


@pytest.mark.parametrize("cache", [EIGHT, dict(kv_bits=4, kv_group_size=32)])
def test_each_turn_equals_a_fresh_quantized_generation(ours, photo, cache):
    chat = Conversation(*ours, vision_cache=VisionCache(), max_pixels=MAX_PIXELS, **cache)
    first = chat.ask("Describe this picture.", images=[pil(photo)], max_tokens=TOKENS, temp=0.0)
    assert chat.cache.quantized and first.tokens == from_scratch(ours, chat, photo, **cache)
    second = chat.ask("And what colour is it?", max_tokens=TOKENS, temp=0.0)
    assert second.stats.cached_tokens > first.stats.prompt_tokens
    assert second.tokens == from_scratch(ours, chat, photo, **cache)
    # The history edited inside the first answer: trimmed back to there, and still exact.
    answer = chat.messages[1]["content"]
    edited = [chat.messages[0], {"role": "assistant", "content": answer[: len(answer) // 2]}]
    turn = [*edited, {"role": "user", "content": "Go on."}]
    held = chat.cached_tokens
    responses = list(chat.stream_messages(turn, max_tokens=TOKENS, temp=0.0))
    assert 0 < responses[-1].cached_tokens < held
    assert [r.token for r in responses] == from_scratch(ours, chat, photo, **cache)


def test_save_and_load_a_quantized_conversation(ours, photo, tmp_path):
    chat = Conversation(*ours, max_pixels=MAX_PIXELS, kv_bits=4)
    chat.ask("Describe this picture.", images=[pil(photo)], max_tokens=8, temp=0.0)
    path = chat.save(tmp_path / "chat.safetensors")
    with open(path, "rb") as file:  # safetensors: 8-byte header length, then the JSON header
        header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
    meta = json.loads(header["__metadata__"]["mimo_mlx.conversation"])
    assert meta["format"] == 3  # 2 added the quantized cache, 3 features for pixels
    assert meta["kv_cache"] == dict(
        kv_bits=4, kv_group_size=64, quantized_kv_start=0, quantized=True
    )
    assert header["kv.0.keys"]["dtype"] == "U32" and "kv.0.value_biases" in header
    again = Conversation.load(path, *ours)
    assert again.cache.quantized and again.cache_options == chat.cache_options
    expected = chat.ask("And the colour?", max_tokens=TOKENS, temp=0.0)
    resumed = again.ask("And the colour?", max_tokens=TOKENS, temp=0.0)
    assert resumed.tokens == expected.tokens and resumed.stats.cached_tokens > 0
    for other in (dict(kv_bits=8), dict(kv_bits=None), dict(kv_bits=4, kv_group_size=32)):
        with pytest.raises(MimoError, match=r"holds a cache stored 4-bit .*\(--kv-bits 4 "):
            Conversation.load(path, *ours, **other)
    float_file = Conversation(*ours).save(tmp_path / "float.safetensors")
    with pytest.raises(MimoError, match="stored full-precision, not 4-bit .*no --kv-bits"):
        Conversation.load(float_file, *ours, kv_bits=4)


def test_a_quantized_cache_switched_on_mid_conversation_is_saved_as_it_is(ours, tmp_path):
    probe = Conversation(*ours)
    probe.ask("Hi", max_tokens=4, temp=0.0)
    start = probe.cached_tokens + 1  # the first turn stays in full precision, the second not
    chat = Conversation(*ours, kv_bits=8, quantized_kv_start=start)
    chat.ask("Hi", max_tokens=4, temp=0.0)
    assert chat.cached_tokens < start and not chat.cache.quantized
    float_state = Conversation.load(chat.save(tmp_path / "early.safetensors"), *ours)
    assert not float_state.cache.quantized and float_state.cache_options == chat.cache_options
    chat.ask("Tell me more about that, please.", max_tokens=4, temp=0.0)
    assert chat.cache.quantized
    again = Conversation.load(chat.save(tmp_path / "late.safetensors"), *ours)
    assert again.cache.quantized and again.cached_tokens == chat.cached_tokens
    for mine, theirs in zip(again.cache.state, chat.cache.state, strict=True):
        assert all(mx.array_equal(a, b).item() for a, b in zip(mine, theirs, strict=True))


# ------------------------------------------------------------------ prompt lookup


def decode(model, ids, vision, lookup=None, tokens=32, **cache_options):
    """(tokens, log-probs, cache) of greedy decoding, plain or with prompt lookup."""
    cache = model.make_cache(**cache_options)
    prompt = model.prepare_prompt(ids, **(vision or {}), cache=cache)
    if lookup is None:
        steps = generate_step(prompt, model, max_tokens=tokens, prompt_cache=cache)
        out = [(t, lp) for t, lp in steps]
    else:
        steps = lookup_generate_step(
            prompt, model, lookup=lookup, max_tokens=tokens, prompt_cache=cache
        )
        out = [(t, lp) for t, lp, _ in steps]
    return [t for t, _ in out], np.stack([np.array(lp) for _, lp in out]), cache


def assert_same_cache(ours, theirs) -> None:
    assert ours.offset == theirs.offset and ours.quantized == theirs.quantized
    for mine, other in zip(ours.state, theirs.state, strict=True):
        for a, b in zip(mine, other, strict=True):
            if a.dtype == mx.uint32:  # packed: a value may round to its neighbour, rarely
                assert np.mean(np.array(a) != np.array(b)) < 0.01
            else:
                np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)
    np.testing.assert_array_equal(ours.next_positions(1), theirs.next_positions(1))


@pytest.mark.parametrize("bits", [8, 4])
def test_prompt_lookup_verifies_and_trims_a_quantized_cache(ours, bits):
    """Drafts verified at every step (most rejected, then trimmed away): the same tokens and
    cache as plain decoding with the same quantized cache."""
    model = ours[0]
    drafted = 0
    for name, (ids, vision) in parity_prompts(np.random.default_rng(8)).items():
        tokens, logprobs, cache = decode(model, ids, vision, kv_bits=bits)
        lookup = forced()
        mine, my_logprobs, my_cache = decode(model, ids, vision, lookup, kv_bits=bits)
        assert mine == tokens, name
        np.testing.assert_allclose(my_logprobs, logprobs, atol=1e-4, err_msg=name)
        assert_same_cache(my_cache, cache)
        drafted += lookup.drafted
    assert drafted > 30


def test_prompt_lookup_accepts_drafts_on_a_quantized_cache(tmp_path):
    from benchmarks.lookup import follow_chain

    model, _ = mimo_mlx.load(write_model_folder(tmp_path / "chain", seed=73, sizes=WIDE_HEADS))
    successor = follow_chain(model, seed=73)
    ids, vision, links = copy_prompt(model, successor, answer=120)
    tokens, logprobs, cache = decode(model, ids, vision, tokens=120, **EIGHT)
    assert tokens == links[:120]  # the model copies the prompt's chain
    lookup = forced()
    mine, my_logprobs, my_cache = decode(model, ids, vision, lookup, tokens=120, **EIGHT)
    assert mine == tokens and lookup.accepted > 80
    np.testing.assert_allclose(my_logprobs, logprobs, atol=1e-4)
    assert_same_cache(my_cache, cache)


# ------------------------------------------------------------------ the server's pool


def test_the_pool_counts_quantized_bytes_and_keeps_each_storage_apart(ours):
    pool = ConversationPool(*ours, vision_cache=VisionCache(), **EIGHT)
    hello = [{"role": "user", "content": "Tell me a story."}]
    first = list(pool.stream(hello, max_tokens=6, temp=0.0))
    assert first[-1].cached_tokens == 0 and pool._entries[0].cache.quantized
    assert pool.stats()["kv_bytes"] == pool._entries[0].cache.nbytes
    float_bytes = sum(layer.nbytes for layer in Conversation(*ours).cache.layers) + sum(
        2 * 256 * 256 * 4
        for _ in ours[0].model.layers  # one 256-token step of float32 k + v
    )
    assert pool.nbytes < 0.35 * float_bytes  # 8 bits + float32 scales and biases: 28%
    # The same start asked in full precision continues nothing of the 8-bit conversation ...
    second = list(pool.stream(hello, max_tokens=6, temp=0.0, kv_bits=None))
    assert second[-1].cached_tokens == 0 and len(pool) == 2
    assert not pool._entries[-1].cache.quantized
    # ... and an 8-bit request does (at least its whole first prompt).
    turn = [*pool._entries[0].messages, {"role": "user", "content": "Go on."}]
    again = list(pool.stream(turn, max_tokens=6, temp=0.0))
    assert again[-1].cached_tokens >= first[-1].prompt_tokens and len(pool) == 2
    assert pool._entries[-1].cache.quantized
    expected = stream_generate(
        *ours, "", inputs=pool._entries[-1]._inputs, max_tokens=6, temp=0.0, **EIGHT
    )
    assert [r.token for r in again] == [r.token for r in expected]
    kept = sum(entry.cache.nbytes + entry.history_bytes for entry in pool._entries)
    assert pool.nbytes == kept and pool.stats()["vision_bytes"] == 0  # no images: KV and history


@pytest.mark.parametrize("endpoint", ["chat", "text"])
def test_a_request_s_cache_fields_are_checked(endpoint):
    limits = Limits(("tiny",), context=4096)
    if endpoint == "chat":
        base = {"messages": [{"role": "user", "content": "Hi"}]}
        parse = parse_chat_request
    else:  # /v1/completions takes the same fields
        base = {"prompt": "Hi"}
        parse = parse_completion_request
    request = parse({**base, "kv_bits": 4, "kv_group_size": 32}, limits)
    assert request.cache == {"kv_bits": 4, "kv_group_size": 32}
    assert parse(base, limits).cache == {}
    for field, value in (("kv_bits", 5), ("kv_bits", "8"), ("kv_group_size", 16)):
        with pytest.raises(APIError) as refused:
            parse({**base, field: value}, limits)
        assert refused.value.param == field and refused.value.status == 400
    with pytest.raises(APIError, match="quantized_kv_start"):
        parse({**base, "quantized_kv_start": 5000}, limits)


def test_the_server_stores_caches_as_its_flag_and_each_request_say(folder, photo, ours, tmp_path):
    flags = ["--kv-bits", "8", "--model-name", "x", "--max-pixels", str(MAX_PIXELS)]
    with ServerProcess(folder, tmp_path / "server.log", *flags) as server:
        client = server.client()
        content = [{"type": "image_url", "image_url": {"url": data_url(photo)}}]
        messages = [{"role": "user", "content": [*content, {"type": "text", "text": "What?"}]}]
        answers = {}
        for bits in (None, 4):
            extra = {} if bits is None else {"kv_bits": bits}
            reply = client.chat.completions.create(
                model="x", messages=messages, max_tokens=TOKENS, temperature=0, extra_body=extra
            )
            answers[bits] = reply.choices[0].message
            if bits is None:  # one conversation of < 256 tokens, in 8 bits: 28% of float32's
                float32_bytes = 2 * 256 * (2 * 2 * 64 * 4)  # layers x step x (k, v) x heads x D
                assert server.health()["cache"]["kv_bytes"] < 0.3 * float32_bytes
        with pytest.raises(openai.BadRequestError, match="kv_bits"):
            client.chat.completions.create(
                model="x", messages=messages, max_tokens=2, extra_body={"kv_bits": 3}
            )
        assert server.health()["cache"]["conversations"] == 2
        # /v1/completions takes the same fields: a raw prompt continued with a 4-bit cache
        text = client.completions.create(
            model="x", prompt=RAW, max_tokens=TOKENS, temperature=0, extra_body={"kv_bits": 4}
        )
        with pytest.raises(openai.BadRequestError, match="kv_bits"):
            client.completions.create(model="x", prompt=RAW, extra_body={"kv_bits": 3})
    four = raw_greedy(ours, RAW, TOKENS, kv_bits=4)
    assert (text.choices[0].text, text.choices[0].finish_reason) == four
    assert four != raw_greedy(ours, RAW, TOKENS, kv_bits=8)  # so the answer shows the field
    for bits, stored in ((None, 8), (4, 4)):
        expected = mimo_mlx.generate(
            *ours, "What?", [photo], max_tokens=TOKENS, temp=0.0, kv_bits=stored,
            max_pixels=MAX_PIXELS,
        )  # fmt: skip
        assert answers[bits].content == expected.answer, bits


# ------------------------------------------------------------------ the command line


def test_generate_and_chat_take_the_cache_flags(folder, photo, ours, tmp_path):
    args = ["generate", "--model", str(folder), "--image", str(photo), "-p", "What is this?"]
    args += ["--temp", "0", "-m", str(TOKENS), "--max-pixels", str(MAX_PIXELS)]
    done = CliRunner().invoke(main, [*args, "--kv-bits", "4", "--kv-group-size", "32"])
    assert done.exit_code == 0, done.output
    expected = mimo_mlx.generate(
        *ours, "What is this?", images=[photo], max_tokens=TOKENS, temp=0.0, kv_bits=4,
        kv_group_size=32, max_pixels=MAX_PIXELS,
    )  # fmt: skip
    assert done.stdout.strip().endswith(expected.answer.strip())
    bad = CliRunner().invoke(main, [*args, "--kv-bits", "6"])
    assert bad.exit_code == 1 and "error: --kv-bits: '6' is not one of '4', '8'" in bad.output
    wide = CliRunner().invoke(main, [*args, "--kv-bits", "8", "--kv-group-size", "128"])
    assert wide.exit_code == 1 and "does not divide this model's head dimension" in wide.output
    # chat: a conversation saved 8-bit loads only into an 8-bit chat
    command = [sys.executable, "-m", "mimo_mlx", "chat", "--model", str(folder), "--temp", "0"]
    command += ["-m", "4"]
    run = dict(capture_output=True, text=True, cwd=tmp_path, timeout=120)
    saved = subprocess.run([*command, "--kv-bits", "8"], input="Hi\n/save c.safetensors\n", **run)
    assert saved.returncode == 0, saved.stderr
    refused = subprocess.run(command, input="/load c.safetensors\n", **run)
    assert refused.returncode == 1
    assert (
        "error: c.safetensors holds a cache stored 8-bit (group 64), not full-precision"
        in refused.stderr
    )
    loaded = subprocess.run(
        [*command, "--kv-bits", "8"], input="/load c.safetensors\nGo on.\n", **run
    )
    assert loaded.returncode == 0 and "(loaded c.safetensors: 1 turn(s)" in loaded.stderr


def test_help_lists_the_cache_flags():
    for command in ("generate", "chat", "serve"):
        text = CliRunner().invoke(main, [command, "--help"]).output
        for flag in ("--kv-bits [4|8]", "--kv-group-size [32|64|128]", "--quantized-kv-start"):
            assert flag in text, (command, flag)
        assert "--video-max-tokens" in text
