"""Text tokenizer: `tokenizer.json` through the `tokenizers` library, plus a streaming detokenizer.

Behaves like transformers' Qwen2Tokenizer for what generation needs: no BOS is added, control
tokens written in the text (`<|im_start|>`, `<|image_pad|>`, ...) encode to their ids, decoding is
the backend's decode. `encode(text, parse_special=False)` reads control-token text as plain text
instead: what people type must never become a control token (see `processor.py`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _Backend

from ..errors import MimoError

# Named special-token slots (transformers' SPECIAL_TOKENS_ATTRIBUTES); chat templates read them.
_NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# ChatML ends a turn with <|im_end|>; base checkpoints end documents with <|endoftext|>.
_ALWAYS_STOP = ("<|im_end|>", "<|endoftext|>")
_REPLACEMENT_CHAR = "\ufffd"
# Counting a long text's tokens piece by piece: pieces of this many characters, cut after a
# newline (else a space); a cut can change the count near it, by this many tokens at most.
_COUNT_PIECE_CHARS = 1 << 16
_COUNT_SLACK_PER_CUT = 8


def byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table): char -> byte value."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in kept]
    table = {chr(b): b for b in kept}
    table.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return table


def read_json_config(path: Path) -> dict[str, Any]:
    """A JSON config file of a model folder as a dict; {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MimoError(
            f"{path} is not valid JSON ({err}); re-download or re-convert the model."
        ) from err
    except OSError as err:
        raise MimoError(f"cannot read {path}: {err.strerror or err}") from None


def _token_content(value: Any) -> str | None:
    # Configs store a token either as a string or as a serialized AddedToken {"content": ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _named_special_tokens(
    config: Mapping[str, Any], legacy_map: Mapping[str, Any]
) -> dict[str, str]:
    # transformers reads special_tokens_map.json only in legacy folders (no added_tokens_decoder).
    source = dict(config)
    if "added_tokens_decoder" not in config:
        source.update(legacy_map)
    named = {key: _token_content(source.get(key)) for key in _NAMED_SPECIAL_TOKENS}
    return {key: value for key, value in named.items() if value is not None}


class StreamingDetokenizer:
    """Turns generated ids into text pieces as they arrive.

    Decodes only a short window: the ids not yet shown, after the ids shown last time (kept as
    context so decoders that treat a sequence start specially still see it). Text ending in U+FFFD
    is held back: a multi-byte UTF-8 character is still incomplete; `finalize` flushes it.
    Concatenating all pieces and `finalize()` gives `tokenizer.decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._window: list[int] = []  # ids from the prefix boundary on
        self._read = 0  # window[:read] is already emitted

    def add_token(self, token_id: int) -> str:
        """Add one generated id; return the text that became final (possibly "")."""
        self._window.append(int(token_id))
        shown = self._decode(self._window[: self._read])
        text = self._decode(self._window)
        if len(text) <= len(shown) or text.endswith(_REPLACEMENT_CHAR):
            return ""  # nothing visible yet, or a character is still split across ids
        # The ids just emitted become the next window's context prefix.
        self._window = self._window[self._read :]
        self._read = len(self._window)
        return text[len(shown) :]

    def finalize(self) -> str:
        """Flush what is held back (an incomplete character decodes to U+FFFD, as in `decode`)."""
        shown = self._decode(self._window[: self._read])
        text = self._decode(self._window)
        self._window, self._read = [], 0
        return text[len(shown) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special) if ids else ""


class Tokenizer:
    """A model folder's tokenizer: encode, decode, stop tokens and the named special tokens."""

    def __init__(
        self,
        backend: _Backend,
        config: Mapping[str, Any] | None = None,
        generation_config: Mapping[str, Any] | None = None,
        special_tokens_map: Mapping[str, Any] | None = None,
    ) -> None:
        self._backend = backend
        # A prompt must never be cut or padded silently, whatever tokenizer.json says.
        backend.no_truncation()
        backend.no_padding()
        config = dict(config or {})
        self._split_special = bool(config.get("split_special_tokens", False))
        backend.encode_special_tokens = self._split_special
        self._mode_lock = threading.Lock()  # encode_special_tokens is the backend's, shared
        self.special_tokens_map: dict[str, str] = _named_special_tokens(
            config, dict(special_tokens_map or {})
        )
        # generation_config.json: stop ids here, sampling defaults for the CLI.
        self.generation_config: dict[str, Any] = dict(generation_config or {})
        self.eos_token_ids: frozenset[int] = self._find_eos_ids(self.generation_config)

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        """Load `tokenizer.json` and the optional tokenizer/generation configs of a model folder."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise MimoError(
                f"No tokenizer.json in {folder}. Point to a complete MiMo-VL model folder "
                "(download it again, or re-run the converter, which copies the tokenizer files)."
            )
        try:
            backend = _Backend.from_file(str(path))
        except Exception as err:  # the Rust loader raises a bare Exception
            raise MimoError(
                f"Cannot read {path} ({err}); download the tokenizer files again."
            ) from err
        return cls(
            backend,
            config=read_json_config(folder / "tokenizer_config.json"),
            generation_config=read_json_config(folder / "generation_config.json"),
            special_tokens_map=read_json_config(folder / "special_tokens_map.json"),
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, parse_special: bool = True) -> list[int]:
        """Token ids of `text`, no BOS/EOS added. Control tokens written in the text map to their
        ids, unless `parse_special` is False: then they are tokenized as the plain text they are."""
        if parse_special:
            return self._backend.encode(text, add_special_tokens=False).ids
        with self._mode_lock:
            self._backend.encode_special_tokens = True
            try:
                return self._backend.encode(text, add_special_tokens=False).ids
            finally:
                self._backend.encode_special_tokens = self._split_special

    @cached_property
    def special_tokens(self) -> tuple[str, ...]:
        """The text of every control token (added tokens flagged special: `<|im_start|>`, ...)."""
        added = self._backend.get_added_tokens_decoder().values()
        return tuple(token.content for token in added if token.special)

    @cached_property
    def _byte_level(self) -> dict[str, int] | None:
        """Byte-level BPE's char -> byte table, when tokenizer.json decodes that way."""
        decoder = json.loads(self._backend.to_str()).get("decoder") or {}
        kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", ())]
        return byte_level_alphabet() if "ByteLevel" in kinds else None

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for. A byte-level token may hold part of a character
        (decoding it alone gives U+FFFD); its bytes are still the real ones, so the bytes of
        consecutive tokens join into the text."""
        token_id = int(token_id)
        piece = self._backend.id_to_token(token_id)
        table = self._byte_level
        if token_id not in self._added and piece is not None and table:
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        return self.decode([token_id]).encode("utf-8", "surrogatepass")

    @cached_property
    def _added(self) -> frozenset[int]:
        return frozenset(self._backend.get_added_tokens_decoder())

    @cached_property
    def max_token_bytes(self) -> int:
        """The most bytes one token stands for: a text of n bytes is at least n / this tokens."""
        table = self._byte_level
        vocab = self._backend.get_vocab(with_added_tokens=True)
        return max(
            (
                len(piece) if table and i not in self._added else len(piece.encode())
                for piece, i in vocab.items()
            ),
            default=1,
        )

    def surely_exceeds(self, text: str, limit: int) -> int | None:
        """A token count `text` reaches when it surely encodes to more than `limit` tokens, found
        without encoding a text longer than about `limit` tokens; None when it may fit.

        Bytes bound the count from both sides (a token stands for 1 to `max_token_bytes` bytes).
        In between, pieces are counted until the count passes the limit by more than a cut can
        change it."""
        size = len(text.encode("utf-8", "surrogatepass"))
        if size <= limit:
            return None
        if size > limit * self.max_token_bytes:
            return -(-size // self.max_token_bytes)
        count, cuts = 0, 0
        for piece in _pieces(text, _COUNT_PIECE_CHARS):
            count += len(self.encode(piece))
            surely = count - _COUNT_SLACK_PER_CUT * cuts
            if surely > limit:
                return surely
            cuts += 1
        return None

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; `skip_special_tokens` drops tokens flagged special (not `<think>`)."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        """The id of `token`; MimoError if the vocabulary lacks it."""
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise MimoError(
                f"The tokenizer has no token {token!r}; is this a MiMo-VL / Qwen2.5-VL model?"
            )
        return token_id

    def has_token(self, token: str) -> bool:
        """Whether `token` is a single entry of the vocabulary."""
        return self._backend.token_to_id(token) is not None

    def to_json(self) -> str:
        """The whole tokenizer as `tokenizer.json` text (what grammar engines build their
        token tables from)."""
        return self._backend.to_str()

    def detokenizer(self, skip_special_tokens: bool = True) -> StreamingDetokenizer:
        """A fresh streaming detokenizer for one generation."""
        return StreamingDetokenizer(self, skip_special_tokens=skip_special_tokens)

    def _find_eos_ids(self, generation_config: dict[str, Any]) -> frozenset[int]:
        eos = generation_config.get("eos_token_id")
        ids = {eos} if isinstance(eos, int) else {i for i in (eos or []) if isinstance(i, int)}
        names = [self.special_tokens_map.get("eos_token"), *_ALWAYS_STOP]
        ids.update(self._backend.token_to_id(name) for name in names if name)
        ids.discard(None)
        return frozenset(ids)


def _pieces(text: str, size: int) -> Iterable[str]:
    """`text` in pieces of about `size` characters, each cut after a newline where there is one
    near the end, else after a space, else anywhere."""
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            for separator in ("\n", " "):
                cut = text.rfind(separator, start + size // 2, end)
                if cut >= 0:
                    end = cut + 1
                    break
        yield text[start:end]
        start = end
