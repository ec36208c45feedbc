"""Tokenizer parity with transformers' Qwen2Tokenizer, and the streaming detokenizer."""

import json
import random
import shutil

import pytest
from tiny_tokenizer import SPECIAL_TOKEN_IDS, TINY_TOTAL_VOCAB, build_tiny_tokenizer

from mimo_mlx.errors import MimoError
from mimo_mlx.inputs.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "  leading and trailing spaces  ",
    "line one\nline two\r\n\ttabbed\n\n\nthree blank lines",
    "The answer is 12. Therefore, the final answer is \\boxed{12}.",
    "图片中有一只猫和一只狗。这是什么？",
    "今日は良い天気ですね。",
    "Emoji: 😀🎉 👍🏽 👨‍👩‍👧 🇫🇷 ❤️",
    "Combining: e\u0301 vs é, Å vs A\u030a (NFC normalizes)",
    "Arabic مرحبا and Hindi नमस्ते and Korean 안녕하세요",
    "<|im_start|>user\nDescribe this.<|im_end|>\n<|im_start|>assistant\n",
    "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>What is it?",
    "<think>\nLet me think.\n</think>\n\nThe answer.",
    "partial tags <|im_sta and <thin k> stay text",
    "I'm sure it's fine, we'll see. They've DONE it; you'd KNOW.",
    "",
    " ",
    "\U0010ffff and \ufffd literal replacement char",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok"))


@pytest.fixture(scope="module")
def ours(folder):
    return Tokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def theirs(folder):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def test_fixture_ids_are_documented(ours, theirs):
    assert ours.vocab_size == TINY_TOTAL_VOCAB == len(theirs)
    for token, token_id in SPECIAL_TOKEN_IDS.items():
        assert ours.token_id(token) == token_id == theirs.convert_tokens_to_ids(token)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(ours, theirs, text):
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_transformers(ours, theirs, text, skip):
    ids = ours.encode(text)
    assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
        ids, skip_special_tokens=skip
    )


@pytest.mark.parametrize("skip", [False, True])
def test_decode_random_ids_matches_transformers(ours, theirs, skip):
    # Random ids split UTF-8 characters anywhere: both must give the same replacement characters.
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 20))]
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
            ids, skip_special_tokens=skip
        )


def test_think_tags_are_not_special(ours):
    ids = ours.encode("<think>a</think><|im_end|>")
    assert ids[0] == SPECIAL_TOKEN_IDS["<think>"]
    assert ours.decode(ids, skip_special_tokens=True) == "<think>a</think>"


def test_eos_token_ids(ours):
    expected = {SPECIAL_TOKEN_IDS["<|im_end|>"], SPECIAL_TOKEN_IDS["<|endoftext|>"]}
    assert ours.eos_token_ids == expected


def test_eos_from_configs_and_vocab(folder, tmp_path):
    shutil.copy(folder / "tokenizer.json", tmp_path / "tokenizer.json")
    # Without configs, the ChatML stop tokens found in the vocab still stop generation.
    expected = {SPECIAL_TOKEN_IDS["<|im_end|>"], SPECIAL_TOKEN_IDS["<|endoftext|>"]}
    assert Tokenizer.from_folder(tmp_path).eos_token_ids == expected
    # An int eos_token_id and an eos_token given as a serialized AddedToken add to them.
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "<think>"}})
    )
    assert Tokenizer.from_folder(tmp_path).eos_token_ids == expected | {
        7,
        SPECIAL_TOKEN_IDS["<think>"],
    }


def test_special_tokens_map(ours, theirs):
    assert ours.special_tokens_map == theirs.special_tokens_map


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(MimoError, match=str(tmp_path)):
        Tokenizer.from_folder(tmp_path)


def test_unknown_token(ours):
    assert not ours.has_token("<|not_a_token|>")
    with pytest.raises(MimoError, match="not_a_token"):
        ours.token_id("<|not_a_token|>")


def _stream(tokenizer, ids, skip):
    detok = tokenizer.detokenizer(skip_special_tokens=skip)
    pieces = [detok.add_token(i) for i in ids]
    return pieces, detok.finalize()


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("text", TEXTS)
def test_streaming_every_prefix(ours, text, skip):
    ids = ours.encode(text)
    for n in range(len(ids) + 1):
        pieces, tail = _stream(ours, ids[:n], skip)
        expected = ours.decode(ids[:n], skip_special_tokens=skip)
        assert "".join(pieces) + tail == expected
        if "\ufffd" not in text:  # a literal U+FFFD may legitimately be emitted
            assert not any("\ufffd" in piece for piece in pieces)


def test_streaming_random_ids(ours):
    rng = random.Random(1)
    for _ in range(50):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 30))]
        pieces, tail = _stream(ours, ids, skip=True)
        assert "".join(pieces) + tail == ours.decode(ids, skip_special_tokens=True)


def test_streaming_decodes_small_windows(ours, monkeypatch):
    text = " ".join(TEXTS) * 3
    ids = ours.encode(text)
    sizes = []
    original = Tokenizer.decode

    def counting_decode(self, window, skip_special_tokens=False):
        sizes.append(len(window))
        return original(self, window, skip_special_tokens)

    monkeypatch.setattr(Tokenizer, "decode", counting_decode)
    pieces, tail = _stream(ours, ids, skip=False)
    monkeypatch.undo()
    assert "".join(pieces) + tail == ours.decode(ids)
    assert len(ids) > 200 and max(sizes) <= 12


# --- text that spells control tokens, the bytes of tokens, counting long texts ----------------


@pytest.mark.parametrize("text", TEXTS)
def test_control_tokens_as_plain_text_match_transformers_split_special_tokens(ours, theirs, text):
    plain = ours.encode(text, parse_special=False)
    assert plain == theirs.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert not set(plain) & {ours.token_id(t) for t in ours.special_tokens}
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)  # mode restored


def test_the_special_tokens_are_the_flagged_added_tokens(ours):
    assert "<|im_start|>" in ours.special_tokens and "<|image_pad|>" in ours.special_tokens
    assert "<think>" not in ours.special_tokens  # an added token, but not a control token


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_join_into_the_text(ours, text):
    """Byte-level tokens may each hold part of a character: alone they decode to U+FFFD, but
    their bytes are the real ones, so a client can rebuild the text from them."""
    ids = ours.encode(text)
    assert b"".join(ours.token_bytes(i) for i in ids) == ours.decode(ids).encode()


def test_a_character_split_across_tokens_has_its_real_bytes(ours):
    ids = ours.encode("中")
    assert len(ids) > 1 and all(ours.decode([i]) == "\ufffd" for i in ids)
    assert b"".join(ours.token_bytes(i) for i in ids).decode() == "中"


def test_max_token_bytes_bounds_every_token(ours):
    longest = max(len(ours.token_bytes(i)) for i in range(ours.vocab_size))
    assert ours.max_token_bytes == longest


def test_surely_exceeds_never_refuses_what_fits_and_stops_early(ours, monkeypatch):
    rng = random.Random(5)
    words = ["hello", "world", "图片", "\n", "  ", "<|im_start|>", "x" * 40, "😀", "The"]
    for _ in range(60):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(0, 3000)))
        count, limit = len(ours.encode(text)), rng.randint(1, 3000)
        found = ours.surely_exceeds(text, limit)
        assert found is None or count >= found > limit
        if count > 4 * limit + 200:
            assert found is not None
    encoded = []
    original = ours.encode
    monkeypatch.setattr(ours, "encode", lambda t, **k: encoded.append(len(t)) or original(t, **k))
    huge = "hello world, how are you today? " * 40_000  # 1.3 MB, 400k tokens here
    assert ours.surely_exceeds(huge, 2000) > 2000 and not encoded  # bytes alone tell
    assert ours.surely_exceeds(huge, 100_000) > 100_000  # bytes alone cannot tell
    assert sum(encoded) < len(huge) // 2  # it stopped once past the limit
