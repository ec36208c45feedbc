"""The images and videos a request points at, read under the server's policy, without decoding.

`data:` URLs (base64) are always read. http(s) URLs are fetched only with `--allow-fetch`, within a
size and a time limit, and only from public addresses (checked after DNS resolution, for every
redirect, and connected to as checked) unless `--allow-fetch-private`; a failed fetch says the same
whatever answered, so the server cannot be used to map a network. Local paths (plain or file://)
are opened only under the folder given to `--allow-local-files DIR`; any other path is refused
without saying whether it exists.

An image is checked from its header only (format, pixels, sides; `inputs.image_files`) and kept
as an `EncodedImage`: it is decoded when its request runs, one image at a time. A request's
images may hold `max_request_pixels` together, since decoding is most of what they cost. A video
becomes a path (a data: or fetched video is written to a temporary file, removed when the request is over;
error messages name the request's field, never the temporary path).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import os
import re
import socket
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from ..errors import MimoError
from ..inputs.image_files import EncodedImage, ImageTooLarge
from .requests import APIError, ChatRequest, MediaRef

log = logging.getLogger("mimo_mlx.serve")

DEFAULT_FETCH_MAX_BYTES = 20 * 2**20
DEFAULT_FETCH_TIMEOUT = 10.0
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
DEFAULT_MAX_REQUEST_PIXELS = 2 * 8192 * 8192  # two of the largest images, ten 12 MP photos
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_VIDEO_SUFFIXES = {"mp4": ".mp4", "webm": ".webm", "quicktime": ".mov", "x-matroska": ".mkv"}
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")  # Python's default repr of an object


@dataclass(frozen=True)
class MediaPolicy:
    """What the server reads for a request. `local_root`: the folder local paths must be in
    (None: no local files); it is resolved (symbolic links followed) when the policy is made."""

    allow_fetch: bool = False
    allow_fetch_private: bool = False
    local_root: Path | None = None
    fetch_max_bytes: int = DEFAULT_FETCH_MAX_BYTES
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS  # all of a request's images together

    def __post_init__(self) -> None:
        if self.local_root is not None:
            object.__setattr__(self, "local_root", Path(os.path.realpath(self.local_root)))


@dataclass
class ResolvedMedia:
    """A request's messages with every `MediaRef` replaced (an `EncodedImage`, or a video path),
    `remove()` for the temporary files made, and `scrub(message)` to take their paths or names
    (and any object's repr, which shows a memory address) out of an error message or a notice."""

    messages: list[dict]
    temporary: dict[str, str] = field(default_factory=dict)  # path -> the request's field

    def remove(self) -> None:
        for path in self.temporary:
            Path(path).unlink(missing_ok=True)

    def scrub(self, message: str) -> str:
        for path, param in self.temporary.items():
            field = f"the video of '{param}'"
            message = message.replace(path, field).replace(Path(path).name, field)
        return _OBJECT_REPR.sub("the data", message)


async def resolve_media(request: ChatRequest, policy: MediaPolicy) -> ResolvedMedia:
    """Read the request's media under `policy`: APIError 400 on the first bad item (temporary
    files made so far are removed)."""
    resolved = ResolvedMedia([])
    read, pixels = {}, 0
    try:
        for ref in request.media:
            read[id(ref)] = item = await _read(ref, policy, resolved)
            if isinstance(item, EncodedImage):
                pixels += item.size[0] * item.size[1]
                if pixels > policy.max_request_pixels:
                    raise APIError(
                        f"the request's images hold more than {policy.max_request_pixels} pixels "
                        "together, more than this server decodes for one request; send fewer or "
                        "smaller images",
                        param=ref.param,
                        code="images_too_large",
                    )
    except BaseException:
        resolved.remove()
        raise
    for message in request.messages:
        content = []
        for part in message["content"]:
            kind = part["type"]
            content.append(part if kind == "text" else {"type": kind, kind: read[id(part[kind])]})
        resolved.messages.append({**message, "content": content})
    return resolved


async def _read(ref: MediaRef, policy: MediaPolicy, resolved: ResolvedMedia):
    url = ref.url
    if url.startswith("data:"):
        data, mime = _data_url(ref)
        suffix = _VIDEO_SUFFIXES.get(mime.partition("/")[2], ".mp4")
    elif (scheme := _SCHEME.match(url)) and scheme.group(1).lower() in ("http", "https"):
        if not policy.allow_fetch:
            raise APIError(
                f"'{ref.param}': this server does not fetch URLs; send the file as a base64 "
                "data: URL",
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
        path = _local_path(ref, policy)
        return path if ref.kind == "video" else await _checked_image(path, ref, policy)
    if ref.kind == "video":
        return await anyio.to_thread.run_sync(_temporary_file, data, suffix, ref.param, resolved)
    return await _checked_image(data, ref, policy)


async def _checked_image(source: bytes | Path, ref: MediaRef, policy: MediaPolicy) -> EncodedImage:
    """The image, checked from its header (in a worker thread: PIL reads files)."""
    try:
        return await anyio.to_thread.run_sync(
            EncodedImage.open, source, f"'{ref.param}'", policy.max_image_pixels
        )
    except ImageTooLarge:
        raise APIError(
            f"'{ref.param}': the image has more pixels than this server decodes (at most "
            f"{policy.max_image_pixels}); scale it down first",
            param=ref.param,
            code="image_too_large",
        ) from None
    except MimoError as err:
        raise APIError(str(err), param=ref.param, code="invalid_image") from None


def _temporary_file(data: bytes, suffix: str, param: str, resolved: ResolvedMedia) -> Path:
    handle, path = tempfile.mkstemp(prefix="mimo-mlx-", suffix=suffix)
    resolved.temporary[path] = param
    with os.fdopen(handle, "wb") as file:
        file.write(data)
    return Path(path)


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


def _local_path(ref: MediaRef, policy: MediaPolicy) -> Path:
    """The file a local path names, inside the allowed folder; the same refusal for a path
    outside it and for one that does not exist there."""
    if policy.local_root is None:
        raise APIError(
            f"'{ref.param}': this server does not open local files; send the file as a base64 "
            "data: URL",
            param=ref.param,
            code="local_files_disabled",
        )
    url = ref.url
    raw = url[len("file://") :] if url.lower().startswith("file://") else url
    root = policy.local_root
    try:
        path = Path(os.path.realpath(root / Path(raw).expanduser()))
        inside = path == root or root in path.parents
        found = path.exists() if ref.kind == "video" else path.is_file()
    except (OSError, ValueError):  # a name too long, a NUL byte, ...
        inside = found = False
    if not (inside and found):
        raise APIError(
            f"'{ref.param}': there is no {ref.kind} at that path in the folder this server reads "
            "local files from",
            param=ref.param,
            code="local_file_unavailable",
        )
    return path


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


class _Refused(Exception):
    """A fetch the policy does not allow (the host has no public address)."""


async def fetch(url: str, policy: MediaPolicy, param: str) -> bytes:
    """The body of a GET of `url`, within the policy's size, time and address limits. Every
    failure but a body too large is the same APIError; the server's log says what happened."""
    import httpx2  # noqa: PLC0415  (only servers that fetch need it)

    limit = policy.fetch_max_bytes
    too_large = APIError(
        f"'{param}': {url} is larger than this server fetches (at most {limit} bytes)",
        param=param,
        code="media_too_large",
    )
    where = "" if policy.allow_fetch_private else " from a public address"
    failed = APIError(
        f"'{param}': could not fetch {url}: no answer with status 200{where} within "
        f"{policy.fetch_timeout:g} s",
        param=param,
        code="fetch_failed",
    )
    transport = httpx2.AsyncHTTPTransport(trust_env=False)  # no proxy: it would connect for us
    if not policy.allow_fetch_private:
        transport = _PublicOnly(transport)
    try:
        with anyio.fail_after(policy.fetch_timeout):
            async with httpx2.AsyncClient(
                transport=transport, follow_redirects=True, max_redirects=3, trust_env=False
            ) as client:
                async with client.stream("GET", url) as response:
                    if response.status_code != 200:
                        raise _Refused(f"HTTP status {response.status_code}")
                    return await read_at_most(
                        response.headers, response.aiter_bytes(), too_large, limit
                    )
    except APIError:
        raise
    except (TimeoutError, _Refused, httpx2.HTTPError, OSError, ValueError) as err:
        log.info("fetching %s for %s failed: %s", url, param, err or type(err).__name__)
        raise failed from None


class _PublicOnly:
    """An httpx2 transport that connects only to public addresses: each request's host is
    resolved here, every address checked, and the connection made to a checked address (the
    Host header and TLS server name stay the URL's), so a second lookup cannot answer
    differently. Redirects come through here too."""

    def __init__(self, inner) -> None:
        self.inner = inner

    async def handle_async_request(self, request):
        host = request.url.host
        port = request.url.port or (443 if request.url.scheme == "https" else 80)
        try:
            found = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as err:
            raise _Refused(f"{host} does not resolve ({err})") from None
        public = [address for *_, (address, *_) in found if _is_public(address)]
        if not public:
            raise _Refused(f"{host} has no public address")
        request.url = request.url.copy_with(host=public[0])
        request.extensions = {**request.extensions, "sni_hostname": host}
        return await self.inner.handle_async_request(request)

    async def __aenter__(self):
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.inner.__aexit__(*exc)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _is_public(address: str) -> bool:
    """Whether an address is a public one: not loopback, private, link-local, shared, reserved,
    unspecified or multicast (an IPv4 address inside IPv6 is judged as IPv4)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast
