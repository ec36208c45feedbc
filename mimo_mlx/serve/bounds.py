"""What a request will cost, known before any of its work is done: a lower bound on its prompt's
tokens, from its images' headers and its text's length.

An image's token count follows from its size alone (`smart_resize`), and the header holds the
size. A token stands for at most `max_token_bytes` bytes of text (128 for MiMo-VL's vocabulary),
so a text of n bytes is at least n / 128 tokens. A request whose bound is past the context is
refused at once, without decoding an image or tokenizing its text; one that may fit goes on, and
the generation thread counts exactly (`Processor.prepare_messages(max_tokens=)` refuses a text
surely too long before tokenizing all of it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..inputs.image_files import EncodedImage
from ..inputs.images import smart_resize
from .events import context_exceeded


@dataclass(frozen=True)
class PromptBounds:
    """The limits a prompt is held to, and what it takes to bound one cheaply."""

    context: int  # most tokens a prompt may have (the model's, or --max-kv-size), minus one
    max_token_bytes: int  # the most text bytes one token stands for
    factor: int  # pixels per merged token side (28)
    min_pixels: int  # the server's defaults, which requests may override
    max_pixels: int

    def check(self, messages: Sequence[Mapping[str, Any]], prompt: Mapping[str, Any]) -> None:
        """APIError 400 (context_length_exceeded) when `messages` (media read by `media.py`)
        surely need more tokens than fit; `prompt`: the request's own prompt options."""
        low = prompt.get("min_pixels") or self.min_pixels
        high = prompt.get("max_pixels") or self.max_pixels
        image_tokens, text_bytes = 0, 0
        for message in messages:
            for part in message["content"]:
                if part["type"] == "text":
                    text_bytes += len(part["text"].encode("utf-8"))
                elif isinstance(image := part.get("image"), EncodedImage):
                    width, height = image.size  # smart_resize is symmetric: orientation is moot
                    h, w = smart_resize(height, width, self.factor, low, max(low, high))
                    image_tokens += (h // self.factor) * (w // self.factor)
        tokens = image_tokens - (-text_bytes // self.max_token_bytes)
        if tokens > self.context:
            raise context_exceeded(tokens, self.context + 1)

    def check_text(self, prompt: str) -> None:
        """The same for a plain text prompt (/v1/completions)."""
        self.check([{"content": [{"type": "text", "text": prompt}]}], {})
