"""The multi-turn scenario: a second question about the same image, with and without reuse.

With reuse, turn 2 continues a `Conversation` that answered turn 1: only the new tokens are
prefilled and the image is not encoded again. Without reuse, turn 2's whole conversation (the
image, turn 1 and its answer, the new question) goes through `stream_generate` from scratch, as a
runtime that keeps nothing between calls does. Both see the same tokens, as the chat template
renders them; the synthetic folders carry a byte-level tokenizer whose special tokens are put at
the ids of the model's config, with Qwen's ChatML template.

Turn 1's answer is kept to printable ASCII tokens, so its text reads back as the same tokens, as
a real model's answer mostly does. Random weights otherwise pick ids that decode to text of many
more tokens (`<unused_i>` names, broken UTF-8): the re-rendered history would then diverge a few
tokens into the answer and turn 2 would prefill the rest of it, several hundred tokens that a real
conversation never has.
"""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np
import tokenizers
from PIL import Image
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from mimo_mlx.conversation.conversation import Conversation
from mimo_mlx.conversation.vision_cache import VisionCache
from mimo_mlx.generation.loop import stream_generate
from mimo_mlx.inputs.images import ImageProcessorConfig
from mimo_mlx.inputs.processor import Processor
from mimo_mlx.inputs.tokenizer import Tokenizer
from mimo_mlx.options import DEFAULT_MAX_PIXELS

from .stats import summarize

# Qwen's special tokens, by their offset from <|endoftext|> (151643 in MiMo-VL).
SPECIAL_OFFSETS = {
    "<|endoftext|>": 0,
    "<|im_start|>": 1,
    "<|im_end|>": 2,
    "<|vision_start|>": 9,
    "<|vision_end|>": 10,
    "<|vision_pad|>": 11,
    "<|image_pad|>": 12,
    "<|video_pad|>": 13,
}
CHATML = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
EOS = "<|im_end|>"
QUESTIONS = ("Describe this picture in detail.", "What colour is the largest object in it?")


def byte_level_tokenizer(config: dict) -> tokenizers.Tokenizer:
    """Byte-level tokens (no merges) with Qwen's special tokens at the config's ids."""
    first_special = config["image_token_id"] - SPECIAL_OFFSETS["<|image_pad|>"]
    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab.update({f"<unused_{i}>": i for i in range(len(vocab), first_special)})
    vocab.update({t: first_special + o for t, o in SPECIAL_OFFSETS.items()})
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_OFFSETS])
    return backend


def chat_processor(config: dict) -> Processor:
    """Byte-level tokens, the specials at the config's ids, ChatML: real text for the scenario."""
    tokenizer = Tokenizer(byte_level_tokenizer(config), config={"eos_token": EOS})
    return Processor(tokenizer, CHATML, ImageProcessorConfig())


def picture(size: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def printable_only(processor: Processor, vocab_size: int):
    """A logits processor that allows only the ids of printable ASCII characters, one token
    each in the byte-level vocabulary: text that encodes back to the same ids."""
    ids = [processor.tokenizer.encode(chr(byte)) for byte in range(ord("!"), ord("~") + 1)]
    assert all(len(i) == 1 for i in ids), "printable ASCII is one token per character"
    allowed = np.zeros(vocab_size, dtype=bool)
    allowed[[i for (i,) in ids]] = True
    mask = mx.array(np.where(allowed, 0.0, -np.inf).astype(np.float32))
    return lambda tokens, logits: logits + mask


def second_turn(model, processor, image, answer_tokens: int, reuse: bool) -> dict:
    """Turn 2's time to first token and tokens computed, with or without the conversation."""
    options = dict(max_tokens=answer_tokens, temp=0.0)
    chat = Conversation(model, processor, vision_cache=VisionCache(), max_pixels=DEFAULT_MAX_PIXELS)
    ascii_answer = [printable_only(processor, model.config.text.vocab_size)]
    chat.ask(QUESTIONS[0], images=[image], logits_processors=ascii_answer, **options)
    mx.eval(chat.cache.state)
    turn = [*chat.messages, {"role": "user", "content": QUESTIONS[1]}]
    started = time.perf_counter()
    if reuse:
        stream = chat.stream_messages(turn, max_tokens=1, temp=0.0)
    else:  # the image itself: a conversation keeps only its features, not its pixels
        fresh = [
            {**m, "content": [{"type": "image", "image": image} if p["type"] == "image" else p
                              for p in m["content"]]} if isinstance(m["content"], list) else m
            for m in turn
        ]  # fmt: skip
        inputs = processor.prepare_messages(fresh, max_pixels=DEFAULT_MAX_PIXELS)
        stream = stream_generate(model, processor, "", inputs=inputs, max_tokens=1, temp=0.0)
    first = next(iter(stream))
    ttft = time.perf_counter() - started
    return {
        "ttft_s": ttft,
        "prompt_tokens": first.prompt_tokens,
        "prefilled_tokens": first.prompt_tokens - first.cached_tokens,
    }


def measure(model, config: dict, image_size: int, answer_tokens: int, warmup: int, runs: int):
    """Both ways, alternating, after `warmup` rounds; medians and the speedup of reuse."""
    processor, image = chat_processor(config), picture(image_size)
    found = {"with_reuse": [], "without_reuse": []}
    for round_ in range(warmup + runs):
        for name, reuse in (("with_reuse", True), ("without_reuse", False)):
            result = second_turn(model, processor, image, answer_tokens, reuse)
            if round_ >= warmup:
                found[name].append(result)
    summary = {
        name: {
            "ttft_s": summarize([r["ttft_s"] for r in results]),
            "prompt_tokens": results[-1]["prompt_tokens"],
            "prefilled_tokens": results[-1]["prefilled_tokens"],
        }
        for name, results in found.items()
    }
    with_reuse, without = (summary[k]["ttft_s"]["median"] for k in ("with_reuse", "without_reuse"))
    summary["speedup"] = without / with_reuse
    summary.update(image_size=image_size, answer_tokens=answer_tokens, questions=list(QUESTIONS))
    return summary
