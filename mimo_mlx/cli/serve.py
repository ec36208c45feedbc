"""`mimo-mlx serve`: the command line of the HTTP server (see `serve/app.py`).

Declared apart from `cli.py` and loaded only when run, like `convert`; nothing heavy is imported
until the command starts, so `--help` answers at once and without the server's extra installed.
"""

from __future__ import annotations

import errno
import signal
import socket
from pathlib import Path

import click

from ..errors import MimoError
from ..options import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_MODEL,
    CacheOptions,
    PromptOptions,
    SamplingOptions,
    pop_cache_options,
    pop_prompt_options,
)
from ..serve.requests import DEFAULT_MAX_IMAGES  # no server dependency: fast --help
from .main import (
    _follow,
    _load,
    _start_group,
    declared_options,
    group_timeout_option,
    model_as_for_generate,
    sampling_defaults,
)


class ByteSize(click.ParamType):
    """A size in bytes: 2147483648, 2GiB, 512MB, 64M (K/M/G are powers of 1024)."""

    name = "bytes"
    units = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().removesuffix("b").removesuffix("i")
        number, unit = text.rstrip("kmgt"), text[len(text.rstrip("kmgt")) :]
        try:
            size = int(float(number) * self.units[unit])
        except (ValueError, KeyError):
            self.fail(f"{value!r} is not a size (e.g. 2GiB, 512MB, 1048576)", param, ctx)
        if size < 1:
            self.fail(f"{value!r} must be at least one byte", param, ctx)
        return size


def _origins(values: tuple[str, ...]) -> tuple[str, ...]:
    """--cors-origin values: '*', 'null', or scheme://host[:port] (no path)."""
    origins = []
    for value in values:
        origin = value.strip().rstrip("/")
        scheme, _, rest = origin.partition("://")
        if origin not in ("*", "null") and not (scheme in ("http", "https") and rest):
            raise click.BadParameter(
                f"{value!r} is not an origin; give scheme://host[:port], like "
                "https://app.example.com or http://localhost:3000 (or '*')",
                param_hint="--cors-origin",
            )
        if "/" in rest:
            raise click.BadParameter(
                f"{value!r}: an origin has no path (https://app.example.com)",
                param_hint="--cors-origin",
            )
        origins.append(origin)
    return tuple(origins)


@click.command()
@model_as_for_generate
@click.option(
    "--model-name",
    metavar="NAME",
    help="The model id /v1/models lists, and a strict check of the 'model' requests send: "
    "then only NAME, the --model value, the model folder's name and the hub id it came from "
    "are accepted (others get 404). Without it, any name is answered (one model is served) and "
    "the id is the --model value.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=8080,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to listen on; 0 lets the system choose a free one (the line saying where it "
    "serves names it).",
)
@click.option(
    "--api-key",
    envvar="MIMO_MLX_API_KEY",
    metavar="KEY",
    help="Require 'Authorization: Bearer KEY' on every endpoint but /health (or set "
    "$MIMO_MLX_API_KEY).",
)
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    metavar="NAME",
    help="Also answer requests that call the server by this name (Host header), e.g. a LAN "
    "name; repeatable. Always answered: 127.0.0.1, localhost, ::1 and the --host address.",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    metavar="ORIGIN",
    callback=lambda ctx, param, values: _origins(values),
    help="Let web pages from this origin (https://app.example.com) call the server from a "
    "browser: preflights are answered and CORS headers added; repeatable; '*' allows every "
    "site (a warning says so). Off: requests carrying any Origin are refused.",
)
@click.option(
    "--allow-fetch",
    is_flag=True,
    help="Fetch http(s) image and video URLs from public addresses (within --fetch-max-bytes "
    "and --fetch-timeout). Off: only base64 data: URLs are read.",
)
@click.option(
    "--allow-fetch-private",
    is_flag=True,
    help="With --allow-fetch, also fetch from loopback, private and link-local addresses "
    "(this machine and its network).",
)
@click.option(
    "--allow-local-files",
    "local_root",
    metavar="DIR",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Open local paths (and file:// URLs) that requests name, inside this folder only; "
    "relative paths start there.",
)
@click.option(
    "--fetch-max-bytes",
    type=ByteSize(),
    default="20MiB",
    show_default=True,
    help="With --allow-fetch: the largest image or video a URL may return; a larger one is "
    "refused.",
)
@click.option(
    "--fetch-timeout",
    type=click.FloatRange(0, min_open=True),
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="With --allow-fetch: seconds a URL may take to return the whole image or video, "
    "redirects included.",
)
@click.option(
    "--max-image-pixels",
    type=click.IntRange(1),
    default=8192 * 8192,
    show_default=True,
    help="Refuse images with more pixels than this, from their header, before decoding them.",
)
@click.option(
    "--max-request-pixels",
    type=click.IntRange(1),
    default=2 * 8192 * 8192,
    show_default=True,
    help="Refuse a request whose images hold more pixels than this together (from their "
    "headers): it bounds the decoding one request costs.",
)
@click.option(
    "--max-images",
    type=click.IntRange(1),
    default=DEFAULT_MAX_IMAGES,
    show_default=True,
    help="Most images and videos one request may hold, its whole conversation counted.",
)
@click.option(
    "--max-tokens",
    "-m",
    default=DEFAULT_MAX_TOKENS,
    show_default=True,
    type=click.IntRange(1),
    help="Most tokens per answer when a request does not say (a request may ask up to the "
    "context).",
)
@click.option(
    "--cache-bytes",
    type=ByteSize(),
    default="2GiB",
    show_default=True,
    help="Memory kept between requests: cached conversations (their KV caches and image "
    "features) and encoded images; least recently used dropped first.",
)
@click.option(
    "--max-kv-size",
    type=click.IntRange(1),
    default=None,
    help="Most tokens one conversation may hold. [default: the model's context]",
)
@click.option(
    "--max-batch",
    "--decode-concurrency",
    "max_batch",
    type=click.IntRange(1),
    default=None,
    help="Requests generated at once: they share every decode step (continuous batching), and "
    "a new one joins between two steps; 1 generates one at a time. [default: 4; 1 under "
    "mlx.launch]",
)
@click.option(
    "--queue-size",
    type=click.IntRange(1),
    default=16,
    show_default=True,
    help="Requests that may wait while --max-batch others generate; more are refused at once "
    "with 503.",
)
@click.option(
    "--request-timeout",
    type=click.FloatRange(0, min_open=True),
    default=600.0,
    show_default=True,
    help="Seconds from a request's arrival to its last token; then it ends with "
    "finish_reason 'length' (or 503 if it never started).",
)
@click.option(
    "--max-body-bytes",
    type=ByteSize(),
    default="64MiB",
    show_default=True,
    help="Largest request body (base64 images included); larger ones get 413.",
)
@group_timeout_option
@declared_options(PromptOptions, SamplingOptions, CacheOptions)
def serve(
    model_path,
    model_name,
    host,
    port,
    api_key,
    allowed_hosts,
    cors_origins,
    allow_fetch,
    allow_fetch_private,
    local_root,
    fetch_max_bytes,
    fetch_timeout,
    max_image_pixels,
    max_request_pixels,
    max_images,
    max_tokens,
    cache_bytes,
    max_kv_size,
    max_batch,
    queue_size,
    request_timeout,
    max_body_bytes,
    group_timeout,
    **options,
):
    """An OpenAI-compatible HTTP server (needs mimo-mlx[serve]).

    \b
    mimo-mlx serve --model ./mimo-vl-4bit
    mimo-mlx serve --model ./mimo-vl-4bit --api-key s3cret --port 9000
    mlx.launch --hostfile hosts.json -- mimo-mlx serve --model ./mimo-vl-4bit

    POST /v1/chat/completions (streaming or not; tools, response_format), POST /v1/completions
    (raw text prompts), GET /v1/models, GET /health. By default it listens on 127.0.0.1 only,
    answers only requests that call it by its own name and come from no web page, needs no key
    and reads images only from base64 data: URLs; --host, --allowed-host, --cors-origin,
    --allow-fetch, --allow-local-files and --api-key change that. Prompt, sampling and cache
    flags set the defaults that requests override (a request's kv_bits, kv_group_size and
    quantized_kv_start choose how its conversation's cache is stored). Up to --max-batch requests
    generate together, sharing each decode step. Under mlx.launch the model is split across the
    ranks and rank 0 serves, one request at a time (each from a fresh cache: reuse across
    requests is not split across ranks).
    """
    import importlib.util  # noqa: PLC0415

    if api_key is not None and not api_key.strip():
        raise click.BadParameter("the key is empty", param_hint="--api-key")
    if allow_fetch_private and not allow_fetch:
        raise click.BadParameter("it needs --allow-fetch", param_hint="--allow-fetch-private")
    if not all(importlib.util.find_spec(name) for name in ("starlette", "uvicorn", "httpx2")):
        raise MimoError('the server needs its extra: pip install "mimo-mlx[serve]"')
    from ..distributed.group import launch_rank, launched  # noqa: PLC0415
    from ..loading import resolve_model  # noqa: PLC0415
    from ..serve.app import build_server, serve_forever  # noqa: PLC0415
    from ..serve.engine import DEFAULT_MAX_BATCH  # noqa: PLC0415
    from ..serve.media import MediaPolicy  # noqa: PLC0415  (fast --help)
    from ..serve.names import model_names  # noqa: PLC0415
    from ..serve.security import AccessPolicy  # noqa: PLC0415

    if launched() and max_kv_size is not None:  # every rank runs this command: all stop here
        raise MimoError(
            "--max-kv-size is not available under mlx.launch yet (each request runs from a fresh "
            "cache there, up to the model's context); run without it"
        )
    if launched() and max_batch is not None and max_batch > 1:
        raise MimoError(
            "--max-batch is not available under mlx.launch yet (the ranks generate one request "
            "at a time there); run without it"
        )
    group = _start_group(group_timeout, handle_signals=launch_rank() != 0)
    if group is not None and group.rank > 0:
        # Ctrl-C reaches every rank: rank 0 finishes its requests, then releases this one.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return _follow(model_path, group)
    listening = _listen(host, port)  # before the model loads: a busy port is known at once
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        click.echo(
            f"warning: listening on {host} without --api-key: anyone who can reach it can use "
            "the model",
            err=True,
        )
    if "*" in cors_origins:
        click.echo(
            "warning: --cors-origin '*': any web page you visit can use this server through your "
            "browser" + ("" if api_key else " (set --api-key to require a key)"),
            err=True,
        )
    model_path = model_path or DEFAULT_MODEL
    model, processor = _load(model_path, group)
    pool = None
    if group is not None:  # rank 0 serves; every request runs across the ranks
        from ..distributed.lockstep import Leader, LeaderPool  # noqa: PLC0415

        leader = Leader(model, processor, group)
        click.get_current_context().call_on_close(leader.close)
        defaults = dict(options)
        pool = LeaderPool(leader, **pop_prompt_options(defaults), **pop_cache_options(defaults))
    engine, settings = build_server(
        model,
        processor,
        names=model_names(model_path, resolve_model(model_path), model_name),
        api_key=api_key,
        media=MediaPolicy(
            allow_fetch,
            allow_fetch_private,
            local_root,
            fetch_max_bytes,
            fetch_timeout,
            max_image_pixels,
            max_request_pixels,
        ),
        max_images=max_images,
        access=AccessPolicy.for_server(host, allowed_hosts, cors_origins),
        max_tokens=max_tokens,
        cache_bytes=cache_bytes,
        max_kv_size=max_kv_size,
        max_batch=1 if group is not None else (max_batch or DEFAULT_MAX_BATCH),
        queue_size=queue_size,
        request_timeout=request_timeout,
        max_body_bytes=max_body_bytes,
        options=sampling_defaults(processor.tokenizer.generation_config, options),
        pool=pool,
    )
    port = listening.getsockname()[1]  # the one the system chose for --port 0
    address = f"[{host}]" if ":" in host else host
    click.echo(f"serving {settings.model_id} on http://{address}:{port}/v1", err=True)
    serve_forever(engine, settings, host, port, listening)


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to host and port (as uvicorn binds one), or one line saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise MimoError(
            f"--host {host} is not an address of this machine ({err.strerror})"
        ) from None
    listening = socket.socket(family, kind, proto)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind(address)
    except OSError as err:
        listening.close()
        if err.errno == errno.EADDRINUSE:
            raise MimoError(
                f"port {port} on {host} is in use (another server?): stop it, or choose another "
                "--port"
            ) from None
        raise MimoError(f"cannot listen on {host} port {port}: {err.strerror or err}") from None
    return listening
