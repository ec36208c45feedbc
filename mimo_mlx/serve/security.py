"""Who may talk to the server: the Host a request names, the Origin a browser sends, the type of
a POST's body; and CORS for the web origins the user allowed.

Any web page can make its visitor's browser send requests to 127.0.0.1. Three checks, made before
any route runs, keep pages out unless the user lets one in:

- Host must be one of the server's own names: 127.0.0.1, localhost, ::1, the --host it listens on
  and every --allowed-host. A page that rebinds its own domain to 127.0.0.1 (DNS rebinding) sends
  that domain as Host, so it is refused (403). Listening on every address (--host 0.0.0.0 or ::),
  any IP address is accepted as Host as well: rebinding needs a name.
- A request with an Origin header (browsers send one on cross-site requests) is refused (403)
  unless that origin was allowed with --cors-origin; without the option browsers cannot call the
  server at all.
- A POST must be application/json (415 otherwise): the only bodies a page can send without a
  preflight are text/plain, form data and multipart.

With --cors-origin, Starlette's CORSMiddleware answers the allowed origins' preflights (OPTIONS)
and adds Access-Control-Allow-Origin to their answers; the checks add it to their own refusals of
an allowed origin's request (a body that is not JSON), so that its page can read why.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from .requests import error_body

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class AccessPolicy:
    """The Host names and web origins the server answers (see the module's docstring)."""

    hosts: frozenset[str] = frozenset(LOOPBACK_NAMES)
    any_address: bool = False  # any IP literal as Host (listening on every address)
    origins: tuple[str, ...] = ()  # "*": every origin

    @classmethod
    def for_server(
        cls, host: str, allowed_hosts: Sequence[str] = (), cors_origins: Sequence[str] = ()
    ) -> AccessPolicy:
        """The policy of a server listening on `host`, with the user's extra names and origins."""
        names = {*LOOPBACK_NAMES, *(_normalized(name) for name in allowed_hosts)}
        wildcard = host in WILDCARD_HOSTS
        if not wildcard:
            names.add(_normalized(host))
        origins = tuple(origin.rstrip("/") for origin in cors_origins)
        return cls(frozenset(names), wildcard, origins)

    def host_allowed(self, header: str | None) -> bool:
        if not header:
            return False
        name = _host_name(header)
        return name in self.hosts or (self.any_address and _is_address(name))

    def origin_allowed(self, origin: str) -> bool:
        return "*" in self.origins or origin in self.origins

    def middleware(self) -> list[Middleware]:
        """The checks, then CORS for the allowed origins (outermost first)."""
        stack = [Middleware(AccessGuard, policy=self)]
        if self.origins:
            stack.append(
                Middleware(
                    CORSMiddleware,
                    allow_origins=list(self.origins),
                    allow_methods=["GET", "POST"],
                    allow_headers=["*"],  # clients add their own (x-stainless-*, ...)
                    allow_private_network=True,  # a public site calling 127.0.0.1 (Chrome asks)
                    max_age=600,
                )
            )
        return stack


class AccessGuard:
    """ASGI middleware refusing a request whose Host, Origin or body type is not allowed."""

    def __init__(self, app: ASGIApp, policy: AccessPolicy) -> None:
        self.app, self.policy = app, policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (refusal := self._refusal(scope)) is not None:
            status, message, code = refusal
            body = json.dumps(error_body(message, "invalid_request_error", None, code)).encode()
            headers = [(b"content-type", b"application/json"), (b"vary", b"Origin")]
            origin = _header(scope, "origin")
            if origin is not None and self.policy.origin_allowed(origin):
                # An allowed page reads why (a body that is not JSON), as CORSMiddleware would
                # let it read any other answer.
                allowed = "*" if "*" in self.policy.origins else origin
                headers.append((b"access-control-allow-origin", allowed.encode("latin-1")))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> tuple[int, str, str] | None:
        headers = {}
        for key, value in scope["headers"]:
            headers.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
        host = headers.get("host")
        if not self.policy.host_allowed(host):
            return (
                403,
                f"this server does not answer to the host name {host!r} (a web page may be "
                "trying to reach it); call it by its address, or by a name the server allows",
                "host_not_allowed",
            )
        origin = headers.get("origin")
        if origin is not None and not self.policy.origin_allowed(origin):
            return (
                403,
                f"requests from the web origin {origin!r} are not allowed: this server answers "
                "web pages only from the origins it was told to allow",
                "origin_not_allowed",
            )
        if scope["method"] == "POST":
            media_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type != "application/json":
                return (
                    415,
                    "the request body must be JSON, sent with 'Content-Type: application/json'",
                    "unsupported_media_type",
                )
        return None


def _header(scope: Scope, name: str) -> str | None:
    """The first value of the header `name` (lower case) in `scope`, or None."""
    key = name.encode("latin-1")
    return next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == key), None)


def _normalized(name: str) -> str:
    return name.strip().lower().rstrip(".").removeprefix("[").removesuffix("]")


def _host_name(header: str) -> str:
    """The name in a Host header, without its port: "[::1]:8080" -> "::1"."""
    header = header.strip()
    if header.startswith("["):
        return _normalized(header[1 : header.find("]")] if "]" in header else header)
    name, _, port = header.rpartition(":")
    return _normalized(name if name and port.isdigit() else header)


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
