"""A conversation saved to one file and resumed later, in this process or another, identically.

The file is safetensors (never pickle): every layer's keys and values, the rotary bookkeeping, the
identity of each cached token, the encoded vision features of the conversation's images and
videos (files of formats 1 and 2 hold their preprocessed pixels instead, and still load), and JSON
metadata (the messages, the options, the file format and the model's fingerprint). A file written
by another model (or the same weights in another dtype) or in another format is refused. A
quantized cache is saved as it is held (packed values, scales and biases, see `model.cache`); the
metadata says how it is stored (`kv_cache`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..errors import MimoError, file_in_the_way
from ..inputs.processor import PreparedMedia
from ..model.cache import PromptCache
from ..model.mimo_vl import Model

FORMAT = 3  # 3: encoded features, not pixels; 2: quantized caches (`kv_cache`); 1: float caches
READABLE_FORMATS = (1, 2, 3)
METADATA_KEY = "mimo_mlx.conversation"


class CannotWrite(MimoError):
    """A conversation file could not be written (the conversation itself is unchanged)."""


def model_fingerprint(model: Model) -> str:
    """Identifies a loaded model: its config, every parameter's name, shape and dtype, and the
    values of a few small ones (norm scales), which differ between any two sets of weights."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(
        json.dumps(dataclasses.asdict(model.config), sort_keys=True, default=str).encode()
    )
    for name, array in tree_flatten(model.parameters()):
        digest.update(f"{name}:{array.shape}:{array.dtype}".encode())
    for array in (model.model.norm.weight, model.model.layers[-1].input_layernorm.weight):
        digest.update(np.asarray(array.astype(mx.float32)).tobytes())
    return digest.hexdigest()


@dataclasses.dataclass
class SavedConversation:
    """What a conversation file holds, apart from the model it belongs to."""

    messages: list  # chat messages, media as PreparedMedia
    tokens: np.ndarray  # identity of each cached token
    cache: PromptCache
    options: dict[str, Any]  # Conversation's settings: prompt options, max_kv_size, drop_old_turns
    features: dict[str, mx.array] = dataclasses.field(default_factory=dict)  # by media key


def save_conversation(saved: SavedConversation, model: Model, path: str | Path) -> Path:
    """Write `saved` (for `model`) to `path`; an existing file is replaced only as a whole."""
    path = Path(path)
    media, messages = _media_and_messages(saved.messages)
    arrays: dict[str, mx.array] = {"tokens": mx.array(saved.tokens)}
    for i, layer in enumerate(saved.cache.layers):
        if layer.offset:
            for name, array in zip(layer.state_names, layer.state, strict=True):
                arrays[f"kv.{i}.{name}"] = array
    for j, (_, next_positions) in enumerate(saved.cache.marks):
        arrays[f"rope.{j}"] = mx.array(next_positions)
    for k, item in enumerate(media):  # encoded features where known, else the pixels
        if item.key in saved.features:
            arrays[f"media.{k}.features"] = saved.features[item.key]
        else:
            arrays[f"media.{k}.pixels"] = mx.array(item.pixel_values)
    meta = {
        "format": FORMAT,
        "mimo_mlx": _version(),
        "model": model_fingerprint(model),
        "messages": messages,
        "media": [_media_record(item) for item in media],
        "rope_starts": [start for start, _ in saved.cache.marks],
        "kv_cache": {**dataclasses.asdict(saved.cache.options), "quantized": saved.cache.quantized},
        "options": saved.options,
    }
    metadata = {METADATA_KEY: json.dumps(meta)}
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial.safetensors")
    try:
        # Opened here first, so a folder that is missing, read-only or not ours is an OSError
        # with its reason; MLX's own open would only say that it failed.
        temporary.open("wb").close()
        mx.save_safetensors(str(temporary), arrays, metadata=metadata)
        os.replace(temporary, path)
    except OSError as err:
        raise CannotWrite(
            f"cannot write {path}: {_reason(err, path)}; nothing was written"
        ) from None
    except RuntimeError as err:  # MLX could not write the whole file
        _remove(temporary)  # first: the free space to report is the disk's without it
        reason = _write_failure(path, _file_size(arrays, metadata), err)
        raise CannotWrite(f"cannot write {path}: {reason}; nothing was written") from None
    finally:
        _remove(temporary)
    return path


def _remove(temporary: Path) -> None:
    with contextlib.suppress(OSError):  # on a read-only disk even this fails
        temporary.unlink(missing_ok=True)


def _file_size(arrays: dict[str, mx.array], metadata: dict[str, str]) -> int:
    """About the size of the safetensors file holding `arrays`: their bytes, the metadata and
    each array's entry in the header (its name, dtype, shape and offsets: under 100 bytes)."""
    entries = sum(len(name) + 100 for name in arrays)
    return sum(array.nbytes for array in arrays.values()) + len(json.dumps(metadata)) + entries


def _reason(err: OSError, path: Path) -> str:
    """Why a file could not be made in `path`'s folder, in words."""
    if isinstance(err, FileNotFoundError):
        return f"the folder {path.parent} does not exist"
    if isinstance(err, NotADirectoryError):
        return f"{file_in_the_way(path.parent) or path.parent} is a file, not a folder"
    if isinstance(err, IsADirectoryError):
        return "it is a folder"
    if err.errno == errno.EROFS:
        return f"{path.parent} is on a read-only disk"
    if isinstance(err, PermissionError):
        return f"no permission to write in {path.parent}"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full"
    if err.errno == errno.EFBIG:
        return "the file is larger than this disk or this process may write"
    return err.strerror or str(err)


def _write_failure(path: Path, needed: int, err: RuntimeError) -> str:
    """Why MLX could not write a file of about `needed` bytes next to `path`, as far as can be
    told (MLX says only that a write failed)."""
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(path.parent).free
        if free < needed:
            return f"the disk is full ({_size(free)} free, about {_size(needed)} needed)"
    return f"MLX could not write it ({str(err).rstrip('.')})"


def _size(count: int) -> str:
    return f"{count / 1e6:,.1f} MB" if count >= 1e6 else f"{count / 1e3:,.0f} kB"


def load_conversation(path: str | Path, model: Model) -> SavedConversation:
    """The conversation saved in `path`, for `model` (which must be the one that saved it)."""
    path = Path(path)
    arrays, meta = _read(path)
    if meta.get("format") not in READABLE_FORMATS:
        raise MimoError(
            f"{path} was written by mimo-mlx {meta.get('mimo_mlx', '?')} in conversation format "
            f"{meta.get('format')}; this mimo-mlx ({_version()}) reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))}"
        )
    if meta.get("model") != model_fingerprint(model):
        raise MimoError(
            f"{path} was saved with another model (or the same weights in another dtype); load "
            "it with the model that saved it, or start a new conversation"
        )
    media = [_prepared(record, arrays, k) for k, record in enumerate(meta["media"])]
    features = {
        item.key: arrays[f"media.{k}.features"]
        for k, item in enumerate(media)
        if f"media.{k}.features" in arrays
    }
    media = [m.encoded(features[m.key], model) if m.key in features else m for m in media]
    tokens = np.asarray(arrays["tokens"], dtype=np.int64)
    stored = dict(meta.get("kv_cache", {}))  # format 1: a float cache
    quantized = stored.pop("quantized", False)
    try:
        cache = model.make_cache(**stored)
    except (TypeError, MimoError) as err:
        raise MimoError(f"{path} is damaged: its cache settings are unusable ({err})") from None
    if quantized:
        cache.quantize()
    for i, layer in enumerate(cache.layers):
        if f"kv.{i}.keys" in arrays:
            names = [f"kv.{i}.{name}" for name in layer.state_names]
            if not all(name in arrays for name in names):
                raise MimoError(f"{path} is damaged: layer {i} of its cache is incomplete")
            layer.state = tuple(arrays[name] for name in names)
    marks = [(s, np.asarray(arrays[f"rope.{j}"])) for j, s in enumerate(meta["rope_starts"])]
    cache.restore_marks(marks)
    if cache.offset != len(tokens):
        raise MimoError(f"{path} is damaged: its cache and its tokens disagree")
    return SavedConversation(
        _with_prepared(meta["messages"], media), tokens, cache, meta["options"], features
    )


def _read(path: Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    if path.is_dir():
        raise MimoError(f"{path} is a folder, not a conversation file")
    if not path.is_file():
        raise MimoError(f"conversation file not found: {path}")
    try:
        # A file we may not read says so (MLX would only say it failed), and one that is not
        # safetensors at all (empty, a photo) is named as such, not by MLX's reader's words.
        with path.open("rb") as file:
            start = file.read(9)
    except OSError as err:
        raise MimoError(f"cannot read {path}: {err.strerror or err}") from None
    if len(start) < 9 or start[8:9] != b"{":  # 8 bytes of header length, then JSON
        raise MimoError(f"{path} is not a mimo-mlx conversation file")
    try:
        # The format is named: MLX would pick it from the extension, and a user may give any.
        arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
        return arrays, json.loads(metadata[METADATA_KEY])
    except KeyError:
        raise MimoError(f"{path} is not a mimo-mlx conversation file") from None
    except (RuntimeError, ValueError, json.JSONDecodeError) as err:
        raise MimoError(f"{path} is damaged or incomplete ({str(err).rstrip('.')})") from None


def _media_and_messages(messages: list) -> tuple[list[PreparedMedia], list]:
    """The prepared media of the history, once each, and the messages referring to them."""
    media: dict[str, tuple[int, PreparedMedia]] = {}
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                item = part.get(part["type"]) if part["type"] in ("image", "video") else None
                if isinstance(item, PreparedMedia):
                    index = media.setdefault(item.key, (len(media), item))[0]
                    parts.append({"type": part["type"], "media": index})
                else:
                    parts.append(part)
            content = parts
        out.append({"role": message["role"], "content": content})
    return [item for _, item in media.values()], out


def _media_record(item: PreparedMedia) -> dict:
    return {
        "kind": item.kind,
        "grid_thw": list(item.grid_thw),
        "second_per_grid_t": item.second_per_grid_t,
        "sizes": item.sizes,
        "key": item.key,
    }


def _prepared(record: dict, arrays: dict[str, mx.array], k: int) -> PreparedMedia:
    sizes = tuple(tuple(s) for s in record["sizes"]) if record["sizes"] else None
    pixels = arrays.get(f"media.{k}.pixels")
    item = PreparedMedia(
        record["kind"],
        None if pixels is None else np.asarray(pixels, dtype=np.float32),
        tuple(record["grid_thw"]),
        record["second_per_grid_t"],
        sizes,
        known_key=None if pixels is not None else record["key"],
    )
    if pixels is None and f"media.{k}.features" not in arrays:
        raise MimoError("the conversation file lacks an image's pixels and features: it is damaged")
    if item.key != record["key"]:
        raise MimoError("the conversation file's media do not match their keys: it is damaged")
    return item


def _with_prepared(messages: list, media: list[PreparedMedia]) -> list:
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [
                {"type": p["type"], p["type"]: media[p["media"]]} if "media" in p else p
                for p in content
            ]
        out.append({"role": message["role"], "content": content})
    return out


def _version() -> str:
    try:
        return package_metadata.version("mimo-mlx")
    except package_metadata.PackageNotFoundError:
        return "unknown"
