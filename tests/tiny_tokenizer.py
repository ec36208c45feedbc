"""A tiny Qwen2-style byte-level BPE tokenizer, built in-process for tests (no network).

`build_tiny_tokenizer(folder)` trains a BPE of `vocab_size` entries on an inline corpus, then
appends the Qwen/MiMo added tokens in a fixed order, so their ids depend only on `vocab_size`:

    id = vocab_size + offset, offsets in `ADDED_TOKENS` order.
    With the default vocab_size=400: <|endoftext|> 400, <|im_start|> 401, <|im_end|> 402,
    <|vision_start|> 403, <|vision_end|> 404, <|vision_pad|> 405, <|image_pad|> 406,
    <|video_pad|> 407, <think> 408, </think> 409; 410 tokens in all (`TINY_TOTAL_VOCAB`).
    With `tool_tokens=True`, Qwen2.5's <tool_call> 410 and </tool_call> 411 follow (a model for
    that tokenizer needs a vocab of at least `TOOL_TOTAL_VOCAB`).

The folder holds tokenizer.json (the normalizer / pre-tokenizer / decoder of transformers'
Qwen2Tokenizer, so our loader and `AutoTokenizer` agree), tokenizer_config.json with the chat
template, and generation_config.json. Tiny models should take image_token_id etc. from
`SPECIAL_TOKEN_IDS` and use a vocab of at least `TINY_TOTAL_VOCAB`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

DEFAULT_VOCAB_SIZE = 400

# (content, special): Qwen's control tokens are special; MiMo's think tags are plain added tokens.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<think>", False),
    ("</think>", False),
)

# Qwen2.5's tool-call tags: plain added tokens too (decoded text keeps them).
TOOL_TOKENS: tuple[tuple[str, bool], ...] = (("<tool_call>", False), ("</tool_call>", False))

# Qwen2's split regex, as in transformers' models/qwen2/tokenization_qwen2.py.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The Qwen2.5-VL ChatML template with MiMo's default system prompt.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are MiMo, an AI assistant developed by Xiaomi.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A text-only template with tools in Qwen2.5's format (tools listed in the system turn, calls as
# <tool_call> JSON, results as <tool_response> in a user turn), as Qwen2.5-VL-style folders keep
# in tokenizer_config.json beside a vision template without tools (chat_template.json).
TOOLS_CHAT_TEMPLATE = (  # newlines after a block tag are written as {{ NL }} (trim_blocks)
    "{% set NL = '\n' %}"
    "{% set default_system = 'You are MiMo, an AI assistant developed by Xiaomi.' %}"
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set rest = messages[1:] %}{% else %}{% set system = default_system %}"
    "{% set rest = messages %}{% endif %}"
    "<|im_start|>system\n{{ system }}"
    "{% if tools %}{{ NL + NL }}# Tools\n\nYou may call one or more functions to assist with the "
    "user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>{% for tool in tools %}{{ NL }}{{ tool | tojson }}{% endfor %}{{ NL }}</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>{% endif %}'
    "<|im_end|>{{ NL }}"
    "{% for message in rest %}"
    "{% if message['role'] == 'tool' %}"
    "{% if loop.first or rest[loop.index0 - 1]['role'] != 'tool' %}<|im_start|>user{% endif %}"
    "{{ NL }}<tool_response>\n{{ message['content'] }}\n</tool_response>"
    "{% if loop.last or rest[loop.index0 + 1]['role'] != 'tool' %}<|im_end|>{{ NL }}{% endif %}"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] or '' }}"
    "{% for call in message.get('tool_calls', []) %}"
    "{% if message['content'] or not loop.first %}{{ NL }}{% endif %}"
    '<tool_call>\n{"name": "{{ call.function.name }}", "arguments": '
    "{{ call.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>{{ NL }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ NL }}{% endif %}"
)

_CORPUS = [
    "You are MiMo, an AI assistant developed by Xiaomi.",
    "Describe this image in detail. What is the man holding in his hand?",
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away!",
    "There are two cats on the sofa, and one of them is sleeping next to a red pillow.",
    "Let me think step by step: first count the apples, then the oranges, then add them.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 3.14159 -7 1e-5 100%",
    "I'm sure it's fine, we'll see. They've done it; you'd know. It isn't hard.",
    "图片中有一只猫和一只狗。这是什么？请详细描述这张图片。",
    "今日は良い天気ですね。写真を説明してください。",
    "Emoji time: 😀 🎉 👍🏽 🚀 ❤️ and café, naïve, résumé, Ærøskøbing, Straße.",
    "Video frames show a person walking along the beach at sunset while waves roll in.",
    "The answer is 12. Therefore, the final answer is \\boxed{12}.",
    "Bounding box: [120, 45, 380, 290] for the bicycle, [10, 10, 50, 60] for the sign.",
]


def special_token_ids(vocab_size: int = DEFAULT_VOCAB_SIZE) -> dict[str, int]:
    """Map each added token to its id for a tiny tokenizer built with `vocab_size`."""
    return {content: vocab_size + i for i, (content, _) in enumerate(ADDED_TOKENS)}


SPECIAL_TOKEN_IDS: dict[str, int] = special_token_ids()
TINY_TOTAL_VOCAB: int = DEFAULT_VOCAB_SIZE + len(ADDED_TOKENS)
TOOL_TOTAL_VOCAB: int = TINY_TOTAL_VOCAB + len(TOOL_TOKENS)


def _qwen2_pipeline(tokenizer: Tokenizer) -> None:
    # Same pipeline transformers' Qwen2Tokenizer rebuilds around the vocab, so both loaders agree.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )


def _train_bpe(vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    _qwen2_pipeline(tokenizer)
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(
            f"corpus too small for vocab_size={vocab_size}: got {tokenizer.get_vocab_size()}"
        )
    return tokenizer


def _added_tokens_decoder(vocab_size: int, added) -> dict[str, dict]:
    return {
        str(vocab_size + i): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for i, (content, special) in enumerate(added)
    }


def _write_configs(folder: Path, vocab_size: int, added) -> None:
    ids = special_token_ids(vocab_size)
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": _added_tokens_decoder(vocab_size, added),
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": 32768,
        "chat_template": CHAT_TEMPLATE,
    }
    generation_config = {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(generation_config, indent=2))


def build_tiny_tokenizer(
    folder: Path, vocab_size: int = DEFAULT_VOCAB_SIZE, tool_tokens: bool = False
) -> Path:
    """Write a tiny Qwen2-style tokenizer folder (loadable by mimo_mlx and transformers)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_bpe(vocab_size)
    added = ADDED_TOKENS + (TOOL_TOKENS if tool_tokens else ())
    tokenizer.add_tokens(
        [AddedToken(content, special=special, normalized=False) for content, special in added]
    )
    assert tokenizer.token_to_id(ADDED_TOKENS[0][0]) == vocab_size  # ids are deterministic
    tokenizer.save(str(folder / "tokenizer.json"))
    _write_configs(folder, vocab_size, added)
    return folder
