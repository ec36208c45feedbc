"""The images and videos a request points at, read under the server's policy.

`data:` URLs (base64) are always read. http(s) URLs are fetched only when the server allows it
(`--allow-fetch`), within a size and a time limit; local paths (plain or file://) are opened only
with `--allow-local-files`. Images are decoded here, upright and RGB, refusing more pixels than the
server allows before any pixel is decoded; a video becomes a path (a data: or fetched video is
written to a temporary file, removed when the request is over).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import tempfile
import warnings
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio
from PIL import Image, ImageOps

from ..errors import MimoError
from ..inputs.images import check_image_size, to_rgb, undecodable
from .requests import APIError, ChatRequest, MediaRef

DEFAULT_FETCH_MAX_BYTES = 20 * 2**20
DEFAULT_FETCH_TIMEOUT = 10.0
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_VIDEO_SUFFIXES = {"mp4": ".mp4", "webm": ".webm", "quicktime": ".mov", "x-matroska": ".mkv"}


@dataclass(frozen=True)
class MediaPolicy:
    """What the server reads for a request."""

    allow_fetch: bool = False
    allow_local_files: bool = False
    fetch_max_bytes: int = DEFAULT_FETCH_MAX_BYTES
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


class _TempFiles:
    def __init__(self) -> None:
        self.paths: list[str] = []

    def write(self, data: bytes, suffix: str) -> Path:
        handle, path = tempfile.mkstemp(prefix="mimo-mlx-", suffix=suffix)
        self.paths.append(path)
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        return Path(path)

    def remove(self) -> None:
        for path in self.paths:
            Path(path).unlink(missing_ok=True)
        self.paths.clear()


async def resolve_media(
    request: ChatRequest, policy: MediaPolicy
) -> tuple[list[dict], Callable[[], None]]:
    """The request's messages with every `MediaRef` replaced by a PIL image or a video path, and
    a function that removes the temporary files made for them. APIError 400 on a bad item."""
    temp = _TempFiles()
    try:
        read = {id(ref): await _read(ref, policy, temp) for ref in request.media}
    except BaseException:
        temp.remove()
        raise
    messages = []
    for message in request.messages:
        content = []
        for part in message["content"]:
            kind = part["type"]
            content.append(part if kind == "text" else {"type": kind, kind: read[id(part[kind])]})
        messages.append({**message, "content": content})
    return messages, temp.remove


async def _read(ref: MediaRef, policy: MediaPolicy, temp: _TempFiles) -> Image.Image | Path:
    url = ref.url
    if url.startswith("data:"):
        data, mime = _data_url(ref)
        suffix = _VIDEO_SUFFIXES.get(mime.partition("/")[2], ".mp4")
    elif (scheme := _SCHEME.match(url)) and scheme.group(1).lower() in ("http", "https"):
        if not policy.allow_fetch:
            raise APIError(
                f"'{ref.param}': this server does not fetch URLs (start it with --allow-fetch); "
                "send the file as a base64 data: URL",
                param=ref.param,
                code="fetch_disabled",
            )
        data = await fetch(url, policy, ref.param)
        suffix = Path(url.split("?")[0]).suffix or ".mp4"
    elif scheme and scheme.group(1).lower() != "file":
        raise APIError(
            f"'{ref.param}': unsupported URL scheme {scheme.group(1)!r} (use data:, http(s): or, "
            "when the server allows it, a local path)",
            param=ref.param,
        )
    else:
        return await _local(ref, policy)
    if ref.kind == "video":
        return temp.write(data, suffix)
    return await anyio.to_thread.run_sync(decode_image, data, policy.max_image_pixels, ref.param)


def _data_url(ref: MediaRef) -> tuple[bytes, str]:
    """(bytes, mime type) of a base64 data: URL."""
    header, _, data = ref.url.partition(",")
    if not header.endswith(";base64") or not data:
        raise APIError(
            f"'{ref.param}': a data URL must be base64, like data:image/png;base64,...",
            param=ref.param,
        )
    try:
        return base64.b64decode(data, validate=True), header[5:].split(";")[0]
    except (binascii.Error, ValueError):
        raise APIError(
            f"'{ref.param}': the data URL is not valid base64", param=ref.param
        ) from None


async def _local(ref: MediaRef, policy: MediaPolicy) -> Image.Image | Path:
    if not policy.allow_local_files:
        raise APIError(
            f"'{ref.param}': this server does not open local files (start it with "
            "--allow-local-files); send the file as a base64 data: URL",
            param=ref.param,
            code="local_files_disabled",
        )
    url = ref.url
    path = Path(url[len("file://") :] if url.lower().startswith("file://") else url).expanduser()
    if ref.kind == "video":
        if not path.exists():
            raise APIError(f"'{ref.param}': no such video file or folder: {path}", param=ref.param)
        return path
    if not path.is_file():
        raise APIError(f"'{ref.param}': no such image file: {path}", param=ref.param)
    return await anyio.to_thread.run_sync(decode_image, path, policy.max_image_pixels, ref.param)


async def read_at_most(
    headers: Mapping[str, str], chunks: AsyncIterator[bytes], too_large: Exception, limit: int
) -> bytes:
    """An HTTP body of at most `limit` bytes; `too_large` is raised as soon as the declared
    Content-Length or the bytes received so far pass it (a client that lies is cut off)."""
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    data = bytearray()
    async for chunk in chunks:
        data += chunk
        if len(data) > limit:
            raise too_large
    return bytes(data)


async def fetch(url: str, policy: MediaPolicy, param: str) -> bytes:
    """The body of a GET of `url`, within the policy's size and time limits."""
    import httpx2  # noqa: PLC0415  (only servers that fetch need it)

    limit = policy.fetch_max_bytes
    too_large = APIError(
        f"'{param}': {url} is larger than this server fetches ({limit} bytes, --fetch-max-bytes)",
        param=param,
        code="media_too_large",
    )
    try:
        with anyio.fail_after(policy.fetch_timeout):
            async with httpx2.AsyncClient(
                follow_redirects=True, max_redirects=3, timeout=policy.fetch_timeout
            ) as client:
                async with client.stream("GET", url) as response:
                    if response.status_code != 200:
                        raise APIError(
                            f"'{param}': fetching {url} answered HTTP {response.status_code}",
                            param=param,
                        )
                    return await read_at_most(
                        response.headers, response.aiter_bytes(), too_large, limit
                    )
    except TimeoutError:
        raise APIError(
            f"'{param}': fetching {url} took longer than {policy.fetch_timeout:g} s "
            "(--fetch-timeout)",
            param=param,
            code="fetch_timeout",
        ) from None
    except httpx2.HTTPError as err:
        raise APIError(f"'{param}': fetching {url} failed: {err}", param=param) from None


def decode_image(source: bytes | Path, max_pixels: int, param: str) -> Image.Image:
    """An image as upright RGB (first frame, EXIF orientation applied, alpha on white), refused
    before decoding when it has more than `max_pixels` pixels."""
    too_large = f"'{param}': the image has more pixels than this server decodes ({max_pixels}, "
    too_large += "--max-image-pixels); scale it down first"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    raise APIError(too_large, param=param, code="image_too_large")
                opened.load()
                image = ImageOps.exif_transpose(opened)
        check_image_size(image.width, image.height, name=f"'{param}': the image")
        return to_rgb(image)
    except APIError:
        raise
    except Image.DecompressionBombError:
        raise APIError(too_large, param=param, code="image_too_large") from None
    except MimoError as err:
        raise APIError(str(err), param=param) from None
    except Exception as err:  # PIL reports broken data in many ways (OSError, ValueError, ...)
        raise APIError(
            f"'{param}': not a readable image: {undecodable(err)}",
            param=param,
            code="invalid_image",
        ) from None
