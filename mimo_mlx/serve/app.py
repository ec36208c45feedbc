"""`mimo-mlx serve`: an OpenAI-compatible HTTP server for one model (Starlette on uvicorn).

    POST /v1/chat/completions   whole, or streamed as server-sent events ending in `data: [DONE]`
    POST /v1/completions        a raw text prompt continued (no chat template), whole or streamed
    GET  /v1/models             the served model (GET /v1/models/{id} for one)
    GET  /health                liveness, the queue and request counts (never needs the key)

Before any route runs, `security` refuses foreign Host names and web origins and non-JSON POSTs.
A request is then checked (`requests`), takes its place in the queue (503 at once if none is
left), has its media read under the policy but not decoded (`media`) and its size bounded
(`bounds`), and waits for the one generation thread (`engine.Engine`), which decodes its images
one at a time. A chat completion answers with a status chosen after the first token: an error
found before generation starts (a prompt past the context, an image the processor refuses, the
time limit reached in the queue) is a proper 4xx/5xx; once streaming, a failure is an error event.
The connection is watched throughout: a client that goes away cancels its request, waiting or
generating. Every error is OpenAI's shape; no traceback reaches a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..conversation.pool import ConversationPool
from ..inputs.images import pixel_range
from ..inputs.processor import Processor
from ..model.mimo_vl import Model
from ..options import DEFAULT_MAX_TOKENS, pop_cache_options, pop_prompt_options
from .bounds import PromptBounds
from .completions import parse_completion_request, text_completion_body
from .engine import Engine
from .events import Delta, Failed, Finished, Job, Started, queue_timeout
from .media import MediaPolicy, read_at_most, resolve_media
from .names import ModelNames
from .requests import (
    DEFAULT_MAX_IMAGES,
    APIError,
    ChatRequest,
    Limits,
    error_body,
    refuse_lone_surrogates,
)
from .responses import chunk_body, completion_body, model_card, usage_chunk_body
from .security import AccessPolicy
from .tools import parse_chat, tool_call_entries

log = logging.getLogger("mimo_mlx.serve")

DEFAULT_MAX_BODY_BYTES = 64 * 2**20
DEFAULT_REQUEST_TIMEOUT = 600.0
DEFAULT_QUEUE_SIZE = 16
# Headers some errors carry: how to authenticate, when to come back.
_ERROR_HEADERS = {401: {"WWW-Authenticate": "Bearer"}, 503: {"Retry-After": "1"}}


@dataclass(frozen=True)
class ServerSettings:
    """What the HTTP side of the server enforces and defaults (the engine has the rest)."""

    model_id: str
    limits: Limits
    bounds: PromptBounds
    api_key: str | None = None
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT  # seconds from arrival to the last token
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_tokens: int = DEFAULT_MAX_TOKENS  # for requests that do not say
    sampling: dict[str, Any] = field(default_factory=dict)  # defaults for requests
    media: MediaPolicy = field(default_factory=MediaPolicy)
    access: AccessPolicy = field(default_factory=AccessPolicy)


def create_app(engine: Engine, settings: ServerSettings) -> Starlette:
    """The ASGI app; it starts the engine's thread on startup and stops it on shutdown."""
    created = int(time.time())

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": settings.model_id, **engine.stats()})

    async def models(request: Request) -> JSONResponse:
        _authorize(request, settings.api_key)
        return JSONResponse({"object": "list", "data": [model_card(settings.model_id, created)]})

    async def model(request: Request) -> JSONResponse:
        _authorize(request, settings.api_key)
        name = request.path_params["name"]
        if name not in settings.limits.model_ids:
            raise APIError(f"the model {name!r} is not served here", 404, code="model_not_found")
        return JSONResponse(model_card(settings.model_id, created))

    async def chat_completions(request: Request) -> ChatCompletion:
        _authorize(request, settings.api_key)
        arrived = time.monotonic()
        body = await _read_json(request, settings.max_body_bytes)
        # Checking a JSON schema compiles it (milliseconds; bounded by llguidance's limits):
        # off the event loop, so other connections are served meanwhile.
        parsed = await anyio.to_thread.run_sync(parse_chat, body, settings.limits)
        del body
        place = engine.reserve()  # 503 now if the queue is full, before any media is read
        try:
            media = await resolve_media(parsed, settings.media)
        except BaseException:
            engine.release(place)
            raise
        try:
            settings.bounds.check(media.messages, parsed.prompt)
            job = Job(
                id=f"chatcmpl-{uuid.uuid4().hex}",
                messages=media.messages,
                options=_generation_options(parsed, settings),
                deadline=arrived + settings.request_timeout,
                loop=asyncio.get_running_loop(),
                stop=parsed.stop,
                top_logprobs=parsed.top_logprobs,
                on_done=media.remove,
                scrub=media.scrub,
                **_tool_parsing(parsed),
            )
            engine.submit(job, place)
        except BaseException:
            engine.release(place)
            media.remove()
            raise
        # The answer needs the request's options, not its messages (their data URLs).
        answer = dataclasses.replace(parsed, messages=[])
        return ChatCompletion(engine, job, answer, settings.model_id)

    async def completions(request: Request) -> TextCompletion:
        _authorize(request, settings.api_key)
        arrived = time.monotonic()
        body = await _read_json(request, settings.max_body_bytes)
        parsed = parse_completion_request(body, settings.limits)
        del body
        place = engine.reserve()
        try:
            settings.bounds.check_text(parsed.prompt)
            max_tokens = parsed.max_tokens if parsed.max_tokens is not None else settings.max_tokens
            job = Job(
                id=f"cmpl-{uuid.uuid4().hex}",
                messages=[],
                prompt=parsed.prompt,
                options={
                    "max_tokens": max_tokens,
                    **settings.sampling,
                    **parsed.sampling,
                    **parsed.cache,
                },
                deadline=arrived + settings.request_timeout,
                loop=asyncio.get_running_loop(),
                stop=parsed.stop,
            )
            engine.submit(job, place)
        except BaseException:
            engine.release(place)
            raise
        return TextCompletion(engine, job, parsed, settings.model_id)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        engine.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(engine.close)

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{name:path}", model, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
        ],
        middleware=settings.access.middleware(),
        exception_handlers={
            ClientDisconnect: _client_gone,
            APIError: _api_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
        lifespan=lifespan,
    )


def _generation_options(request: ChatRequest, settings: ServerSettings) -> dict[str, Any]:
    """What `ConversationPool.stream` takes: the request's options over the server's defaults,
    the tools to show the model and the format its answer must have."""
    max_tokens = request.max_tokens if request.max_tokens is not None else settings.max_tokens
    options = {
        "max_tokens": max_tokens,
        **settings.sampling,
        **request.sampling,
        **request.prompt,
        **request.cache,
    }
    if request.tools is not None:
        options["tools"] = request.tools.definitions
    if request.output_format is not None:
        options["output_format"] = request.output_format
    return options


def _tool_parsing(request: ChatRequest) -> dict[str, Any]:
    """The Job's tool-call parsing: the tools offered, and at most one call unless parallel."""
    if request.tools is None:
        return {}
    return {
        "tool_names": tuple(request.tools.names),
        "max_calls": None if request.tools.parallel else 1,
    }


def _authorize(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), api_key.encode()
    ):
        raise APIError(
            "missing or incorrect API key: send 'Authorization: Bearer KEY' with the server's key",
            401,
            code="invalid_api_key",
        )


async def _read_json(request: Request, limit: int) -> Any:
    """The request body as JSON; 413 past `limit` bytes (checked as it arrives)."""
    too_large = APIError(
        f"the request body is larger than this server accepts (at most {limit} bytes)",
        413,
        code="request_too_large",
    )
    body = await read_at_most(request.headers, request.stream(), too_large, limit)
    try:
        decoded = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as err:
        raise APIError(f"the request body is not valid JSON ({err})", code="invalid_json") from None
    refuse_lone_surrogates(decoded)
    return decoded


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), error.status, headers=_ERROR_HEADERS.get(error.status))


async def _api_error(request: Request, error: Exception) -> JSONResponse:
    return _error_response(error)


async def _client_gone(request: Request, error: Exception) -> Response:
    """A client that hung up while sending its request: nobody to answer; one line in the log."""
    log.info(
        "a client went away while sending its request (%s %s)", request.method, request.url.path
    )
    return Response(status_code=400)


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    status = error.status_code
    message = {
        404: f"no such endpoint: {request.method} {request.url.path} (the API is "
        "POST /v1/chat/completions, POST /v1/completions and GET /v1/models)",
        405: f"{request.method} is not allowed on {request.url.path}",
    }.get(status, str(error.detail))
    return _error_response(APIError(message, status, code="not_found" if status == 404 else None))


async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=error)
    return JSONResponse(error_body("internal error; see the server log", "server_error"), 500)


class ChatCompletion:
    """The ASGI response of one chat completion: waits for its job's first event, then answers
    whole or as a stream, watching the connection to cancel the job if the client goes away.
    What preparing the request's media changed (a video fitted to its token budget) goes to the
    client as `notices`, beside the choices of the whole answer or of the stream's first chunk."""

    def __init__(self, engine: Engine, job: Job, request: ChatRequest, model: str) -> None:
        self.engine, self.job, self.request = engine, job, request
        self.created = int(time.time())
        self.model = model
        self._answered = False
        self.notices: dict[str, list[str]] = {}  # {"notices": [...]} when there are any

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(self._watch, receive, group.cancel_scope)
            try:
                await self._respond(send)
            except OSError:  # the client went away while we wrote to it
                pass
            finally:
                if not self._answered:
                    self.engine.cancel(self.job)
                group.cancel_scope.cancel()

    async def _watch(self, receive: Receive, scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.engine.cancel(self.job)
        scope.cancel()

    async def _next(self) -> Any:
        return await self.job.events.get()

    async def _first(self) -> Any:
        """The first event; a job still waiting when its time is up is dropped from the queue."""
        with anyio.move_on_after(max(self.job.deadline - time.monotonic(), 0.0)):
            return await self._next()
        if self.engine.expire(self.job):
            return Failed(queue_timeout())
        return await self._next()  # it runs: the engine ends it at its next token

    async def _respond(self, send: Send) -> None:
        first = await self._first()
        if isinstance(first, Started) and first.notices:
            self.notices = {"notices": list(first.notices)}
        if isinstance(first, Failed):
            await self._send_json(send, first.error.status, first.error.body())
        elif self.request.stream:
            await self._stream(send)
        else:
            await self._whole(send)
        self._answered = True

    async def _whole(self, send: Send) -> None:
        reasoning, content, logprobs, calls = [], [], [], []
        while True:
            event = await self._next()
            if isinstance(event, Delta):
                reasoning.append(event.reasoning)
                content.append(event.content)
                logprobs.extend(event.logprobs or ())
                calls.extend(event.tool_calls)
            elif isinstance(event, Failed):
                await self._send_json(send, event.error.status, event.error.body())
                return
            elif isinstance(event, Finished):
                body = completion_body(
                    self.job.id,
                    self.created,
                    self.model,
                    content="".join(content),
                    reasoning="".join(reasoning),
                    finish_reason=event.finish_reason,
                    usage=event.usage,
                    timings=event.timings,
                    logprobs=logprobs if self.request.top_logprobs is not None else None,
                    tool_calls=tool_call_entries(calls, 0),
                )
                await self._send_json(send, 200, {**body, **self.notices})
                return

    async def _start_stream(self, send: Send) -> None:
        """Begin a 200 server-sent-event stream (proxies told not to buffer it)."""
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})

    async def _stream(self, send: Send) -> None:
        await self._start_stream(send)
        first = self._chunk({"role": "assistant", "content": ""}, **self.notices)
        await self._event(send, first)
        calls = 0
        while True:
            event = await self._next()
            if isinstance(event, Delta):
                delta = {"reasoning_content": event.reasoning} if event.reasoning else {}
                if event.content:
                    delta["content"] = event.content
                if event.tool_calls:
                    delta["tool_calls"] = tool_call_entries(list(event.tool_calls), calls)
                    calls += len(event.tool_calls)
                await self._event(send, self._chunk(delta, logprobs=event.logprobs))
            elif isinstance(event, Failed):
                await self._event(send, event.error.body())
                break
            elif isinstance(event, Finished):
                final = self._chunk({}, finish_reason=event.finish_reason, timings=event.timings)
                await self._event(send, final)
                if self.request.include_usage:
                    usage = usage_chunk_body(self.job.id, self.created, self.model, event.usage)
                    await self._event(send, usage)
                break
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    def _chunk(self, delta: dict, **extra: Any) -> dict:
        return chunk_body(self.job.id, self.created, self.model, delta, **extra)

    @staticmethod
    async def _event(send: Send, body: dict) -> None:
        data = b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"
        await send({"type": "http.response.body", "body": data, "more_body": True})

    @staticmethod
    async def _send_json(send: Send, status: int, body: dict) -> None:
        headers = _ERROR_HEADERS.get(status, {})
        response = JSONResponse(body, status, headers=headers)
        await send(
            {"type": "http.response.start", "status": status, "headers": response.raw_headers}
        )
        await send({"type": "http.response.body", "body": response.body, "more_body": False})


class TextCompletion(ChatCompletion):
    """The response of a text completion: the same waiting, watching and streaming as a chat
    completion, with `text_completion` objects (the prompt first when `echo` is set)."""

    async def _whole(self, send: Send) -> None:
        text = [self.request.prompt] if self.request.echo else []
        while True:
            event = await self._next()
            if isinstance(event, Delta):
                text.append(event.content)
            elif isinstance(event, Failed):
                await self._send_json(send, event.error.status, event.error.body())
                return
            elif isinstance(event, Finished):
                body = self._body("".join(text), event.finish_reason, usage=event.usage)
                await self._send_json(send, 200, {**body, "timings": event.timings})
                return

    async def _stream(self, send: Send) -> None:
        await self._start_stream(send)
        if self.request.echo:
            await self._event(send, self._body(self.request.prompt, None))
        while True:
            event = await self._next()
            if isinstance(event, Delta):
                if event.content:
                    await self._event(send, self._body(event.content, None))
            elif isinstance(event, Failed):
                await self._event(send, event.error.body())
                break
            elif isinstance(event, Finished):
                await self._event(send, self._body("", event.finish_reason, timings=event.timings))
                if self.request.include_usage:  # as OpenAI ends it: no choices, the usage
                    usage = {**self._body("", None), "choices": [], "usage": event.usage}
                    await self._event(send, usage)
                break
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    def _body(self, text: str, finish_reason: str | None, **extra: Any) -> dict:
        return text_completion_body(
            self.job.id, self.created, self.model, text, finish_reason, **extra
        )


def build_server(
    model: Model,
    processor: Processor,
    *,
    names: ModelNames,
    api_key: str | None,
    media: MediaPolicy,
    max_tokens: int,
    cache_bytes: int,
    max_kv_size: int | None,
    queue_size: int,
    max_batch: int = 1,
    request_timeout: float,
    max_body_bytes: int,
    options: dict[str, Any],
    pool: Any = None,
    max_images: int = DEFAULT_MAX_IMAGES,
    access: AccessPolicy | None = None,
) -> tuple[Engine, ServerSettings]:
    """The engine (a conversation pool over the model) and the settings for `create_app`.
    `options`: prompt and cache options (the pool's defaults) and sampling options (requests'
    defaults). `names`: what requests may call the model (`names.model_names`). `pool` replaces
    the conversation pool (under mlx.launch: `lockstep.LeaderPool`, which runs one request at a
    time: `max_batch` 1). `max_batch` requests generate at once (see `serve.engine`)."""
    options = dict(options)
    prompt = pop_prompt_options(options)
    cache = pop_cache_options(options)
    if pool is None:
        pool = ConversationPool(
            model, processor, max_bytes=cache_bytes, max_kv_size=max_kv_size, **prompt, **cache
        )
    config = processor.image_config
    pixels = [config.max_pixels, prompt.get("max_pixels") or 0]
    context = max_kv_size or model.config.text.max_position_embeddings
    limits = Limits(
        names.names, context, max(pixels), any_model=not names.strict, max_images=max_images
    )
    low, high = pixel_range(config, prompt.get("min_pixels"), prompt.get("max_pixels"))
    bounds = PromptBounds(
        context - 1, processor.tokenizer.max_token_bytes, config.factor, low, high
    )
    settings = ServerSettings(
        model_id=names.id,
        limits=limits,
        bounds=bounds,
        access=access or AccessPolicy(),
        api_key=api_key,
        request_timeout=request_timeout,
        max_body_bytes=max_body_bytes,
        max_tokens=max_tokens,
        sampling={k: v for k, v in options.items() if v is not None},
        media=media,
    )
    return Engine(pool, processor.tokenizer, queue_size, max_batch), settings


def serve_forever(
    engine: Engine,
    settings: ServerSettings,
    host: str,
    port: int,
    listening: socket.socket | None = None,
) -> None:
    """Run the server until interrupted (Ctrl-C or SIGTERM), on the `listening` socket if one is
    given (bound to host and port already), else on one it binds."""
    import uvicorn  # noqa: PLC0415

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # uvicorn waits for open connections before it shuts the app down: end the
            # requests first (each gets a 503 or an error event), so that wait is short.
            engine.stop()
            super().handle_exit(sig, frame)

    if not log.handlers:  # uvicorn configures its own loggers only
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    config = uvicorn.Config(
        create_app(engine, settings),
        host=host,
        port=port,
        log_level="info",
        timeout_graceful_shutdown=5,
    )
    Server(config).run(sockets=None if listening is None else [listening])
