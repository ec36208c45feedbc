"""What hostile or careless requests cost `mimo-mlx serve`, measured on 127.0.0.1 (see
benchmarks/README.md, "Server safety").

    python -m benchmarks.serve_safety --scale tiny          # synthetic weights (128k context)
    python -m benchmarks.serve_safety --model ~/models/mimo-vl-7b-rl-4bit

Each group of scenarios runs against its own server subprocess (after one warm-up request with a
small image), whose resident memory (RSS) is sampled every 10 ms with psutil; growth is measured
from the RSS just before each request:

- huge_images: one request holding 8 PNGs that each decode to 8192x8192 (the same one, about
  1 MB), RGB and RGBA (refused from their headers: past --max-request-pixels), then one holding 2 of them
  with a small pixel budget (answered: decoded one at a time, each shrunk while decoding):
  status, seconds, peak growth.
- huge_images_queue_full: the same request while the queue is full (one answer generating, one
  waiting, --queue-size 1): the 503's seconds and growth, against a text request's.
- huge_text: 60 MB of text in one message: status, seconds, growth.
- distinct_images: 40 requests, each with a different image (896x896 by default), under
  --cache-bytes 64MiB: the RSS growth after them, and what /health says the cache holds.
- shrunk_decode (in this process): how far the shrinking decode moves the resized pixels from
  the exact ones, for an 8192x6144 photo with text as PNG and JPEG, at the default pixels.

Writes results.json and results.md; fails if a scenario answers with a 5xx.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import click
import httpx2
import numpy as np
import psutil
from PIL import Image, ImageDraw

from mimo_mlx.inputs.image_files import EncodedImage, decode_image
from mimo_mlx.inputs.images import ImageProcessorConfig, preprocess_encoded, preprocess_images

from .machine import REPO, provenance
from .serve_load import Server, served_model, server_preload
from .settings import CACHE

MB = 1e6


@functools.lru_cache(maxsize=8)
def png_url(size: int, mode: str = "RGB", seed: int = 0) -> str:
    """A PNG data URL that decodes to size x size pixels but compresses to little: smooth colour
    from a few random values (distinct per seed)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (4, 4, 4), dtype=np.uint8), "RGBA")
    image = small.convert(mode).resize((size, size), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_request(urls: list[str], max_tokens: int = 4, **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    content.append({"type": "text", "text": "Describe these pictures."})
    return {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }


class RssPeak:
    """The peak RSS of a process while the block runs (sampled every 10 ms), and its RSS after."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.before = self.process.memory_info().rss
        self.peak = self.after = self.before
        self._running = False

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)

    def __enter__(self) -> RssPeak:
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._running = False
        self._thread.join()
        self.after = self.process.memory_info().rss
        self.peak = max(self.peak, self.after)

    def growth(self) -> dict:
        return {"peak_growth_mb": (self.peak - self.before) / MB, "after_mb": self.after / MB}


def post(url: str, body: dict | bytes, timeout: float = 600.0) -> tuple[int, dict, float]:
    """(status, JSON answer, seconds) of one chat completion."""
    started = time.perf_counter()
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    response = httpx2.post(
        url + "/v1/chat/completions", content=content, headers=headers, timeout=timeout
    )
    return response.status_code, response.json(), time.perf_counter() - started


def warm_up(server: Server) -> None:
    status, answer, _ = post(server.url, image_request([png_url(224, seed=999)]))
    if status != 200:
        raise click.ClickException(f"the warm-up request failed: {answer}")


def huge_images(
    server: Server, count: int = 8, size: int = 8192, mode: str = "RGB", **extra
) -> dict:
    """One request with `count` images decoding to size x size (the same PNG `count` times:
    each is checked and decoded on its own)."""
    body = image_request([png_url(size, mode)] * count, **extra)
    with RssPeak(server.process.pid) as rss:
        status, answer, seconds = post(server.url, body)
    return {
        "images": count,
        "size": size,
        "mode": mode,
        "max_pixels": extra.get("max_pixels"),  # None: the server's default
        "request_bytes": len(json.dumps(body)),
        "status": status,
        "code": answer.get("error", {}).get("code") if status != 200 else None,
        "seconds": seconds,
        **rss.growth(),
    }


def fill_queue(server: Server, max_tokens: int) -> tuple[httpx2.Client, object, socket.socket]:
    """One streamed answer generating and one request waiting behind it (--queue-size 1)."""
    client = httpx2.Client(timeout=600)
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}]}
    body.update(max_tokens=max_tokens, temperature=0, stream=True)
    stream = client.stream("POST", server.url + "/v1/chat/completions", json=body)
    response = stream.__enter__()
    if response.status_code != 200:
        raise click.ClickException(f"the long answer was refused: {response.read()}")
    data = json.dumps(dict(body, stream=False)).encode()
    waiting = socket.create_connection(("127.0.0.1", server.port))
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
    head += f"application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    waiting.sendall(head.encode() + data)
    deadline = time.monotonic() + 30
    while server.health()["queue"]["waiting"] < 1:
        if time.monotonic() > deadline:
            raise click.ClickException("the second request never reached the queue")
        time.sleep(0.02)
    return client, stream, waiting


def queue_full(
    server: Server, max_tokens: int, count: int = 8, size: int = 8192, mode: str = "RGB"
) -> dict:
    """A text request and a request with huge images, each sent while the queue is full."""
    huge = image_request([png_url(size, mode)] * count)
    text = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    client, stream, waiting = fill_queue(server, max_tokens)
    try:
        results = {}
        for name, body in (("text", text), ("huge_images", huge)):
            with RssPeak(server.process.pid) as rss:
                status, answer, seconds = post(server.url, body)
            results[name] = {
                "status": status,
                "code": answer.get("error", {}).get("code"),
                "seconds": seconds,
                **rss.growth(),
            }
        return results
    finally:
        waiting.close()
        stream.__exit__(None, None, None)
        client.close()


def huge_text(server: Server, megabytes: float = 60) -> dict:
    words = "the quick brown fox jumps over the lazy dog "
    text = words * int(megabytes * MB / len(words))
    body = json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": 4})
    with RssPeak(server.process.pid) as rss:
        status, answer, seconds = post(server.url, body.encode())
    return {
        "request_bytes": len(body),
        "status": status,
        "code": answer.get("error", {}).get("code"),
        "seconds": seconds,
        **rss.growth(),
    }


def distinct_images(server: Server, count: int = 40, size: int = 896, **extra) -> dict:
    """`count` requests, each a new conversation with an image no other request has."""
    started = time.perf_counter()
    statuses = []
    with RssPeak(server.process.pid) as rss:
        for seed in range(count):
            body = image_request([png_url(size, "RGB", 1000 + seed)], **extra)
            statuses.append(post(server.url, body)[0])
    cache = server.health()["cache"]
    return {
        "requests": count,
        "size": size,
        "statuses": sorted(set(statuses)),
        "seconds": time.perf_counter() - started,
        "growth_mb": (rss.after - rss.before) / MB,
        "cache": cache,
        **rss.growth(),
    }


def photo_with_text(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like picture: smooth colour, sensor-like noise, and dark text of many sizes."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 64 + 2, width // 64 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
    noisy = np.clip(smooth.astype(np.int16) + rng.normal(0, 12, smooth.shape), 0, 255)
    image = Image.fromarray(noisy.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(width * height // 125_000):
        x, y = int(rng.integers(0, width - 600)), int(rng.integers(0, height - 150))
        draw.text((x, y), "Hello world 123", fill=(0, 0, 0), font_size=int(rng.integers(20, 120)))
    return image


def shrunk_decode(width: int = 8192, height: int = 6144) -> list[dict]:
    """How far the server's shrinking decode moves the resized pixels from the exact ones (what
    transformers computes from the full image), for a PNG and a JPEG at the default pixels."""
    image = photo_with_text(width, height)
    config = ImageProcessorConfig()
    found = []
    for fmt, options in (("PNG", {}), ("JPEG", {"quality": 92})):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        data = buffer.getvalue()
        exact, _ = preprocess_images([decode_image(data, "it")], config)
        started = time.perf_counter()
        shrunk, _, _ = preprocess_encoded(EncodedImage.open(data, "it", width * height), config)
        seconds = time.perf_counter() - started
        std = np.repeat(np.asarray(config.image_std, np.float32), 2 * 14 * 14)
        levels = np.abs((shrunk - exact) * std) * 255  # in 0-255 pixel levels
        found.append(
            {
                "format": fmt,
                "size": [width, height],
                "mean_levels": float(levels.mean()),
                "p99_9_levels": float(np.percentile(levels, 99.9)),
                "max_levels": float(levels.max()),
                "shrunk_decode_s": seconds,
            }
        )
    return found


def started_server(folder: Path, log_path: Path, flags: list[str], preload: str | None) -> Server:
    server = Server(folder, log_path, flags, preload)
    server.wait_until_up()
    warm_up(server)
    return server


def run_all(folder: Path, out: Path, preload: str | None, settings: dict) -> dict:
    """Every scenario, each on a fresh server; results by scenario."""
    results: dict = {"shrunk_decode": shrunk_decode()}
    small = {"max_pixels": settings["small_pixels"]}
    plans = [
        ("huge_images", []),
        ("huge_images_queue_full", ["--max-batch", "1", "--queue-size", "1"]),
        ("huge_text", []),
        ("distinct_images", ["--cache-bytes", settings["cache_bytes"]]),
    ]
    for name, flags in plans:
        server = started_server(folder, out / f"{name}.log", flags, preload)
        try:
            if name == "huge_images":
                results[name] = [
                    huge_images(server, count, settings["size"], mode, **extra)
                    for mode in ("RGB", "RGBA")
                    for count, extra in ((settings["images"], {}), (2, small))
                ]
            elif name == "huge_images_queue_full":
                results[name] = queue_full(
                    server, settings["long_answer"], settings["images"], settings["size"]
                )
            elif name == "huge_text":
                results[name] = huge_text(server, settings["text_mb"])
            else:
                results[name] = distinct_images(
                    server, settings["distinct"], settings["distinct_size"]
                )
                results[name]["cache_bytes"] = settings["cache_bytes"]
        finally:
            server.stop()
    return results


def markdown(report: dict) -> str:
    r, m = report["results"], report["machine"]
    lines = [
        "# mimo-mlx serve: bounded work and kept memory",
        "",
        f"`{report['command']}` at {report['started_utc']}, commit "
        f"`{(report['git']['commit'] or 'unknown')[:12]}`"
        + (" (uncommitted changes)" if report["git"]["dirty"] else ""),
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, {m['os']}; weights: "
        f"{report['settings']['weights']}. Growth: the server process's RSS (psutil, every "
        "10 ms) above its value just before the request; each group of scenarios runs on a "
        "fresh server, after one warm-up request.",
        "",
        "| scenario | status | seconds | peak RSS growth, MB |",
        "|---|---|---|---|",
    ]
    for item in r["huge_images"]:
        budget = f"max_pixels {item['max_pixels']}" if item["max_pixels"] else "default pixels"
        lines.append(
            f"| {item['images']} PNGs of {item['size']}x{item['size']} {item['mode']}, {budget} "
            f"({item['request_bytes'] / MB:.1f} MB request) | {item['status']} "
            f"{item['code'] or ''} | {item['seconds']:.2f} | {item['peak_growth_mb']:.0f} |"
        )
    for name, item in r["huge_images_queue_full"].items():
        lines.append(
            f"| queue full: {name.replace('_', ' ')} | {item['status']} {item['code']} | "
            f"{item['seconds']:.2f} | {item['peak_growth_mb']:.0f} |"
        )
    text = r["huge_text"]
    lines.append(
        f"| {text['request_bytes'] / MB:.0f} MB of text | {text['status']} {text['code']} | "
        f"{text['seconds']:.2f} | {text['peak_growth_mb']:.0f} |"
    )
    lines += [
        "",
        "| shrunk decode | mean | 99.9th percentile | max (of 255 levels) |",
        "|---|---|---|---|",
    ]
    for item in r.get("shrunk_decode", ()):
        lines.append(
            f"| {item['format']} {item['size'][0]}x{item['size'][1]} photo with text | "
            f"{item['mean_levels']:.2f} | {item['p99_9_levels']:.1f} | {item['max_levels']:.0f} |"
        )
    d = r["distinct_images"]
    lines += [
        "",
        f"{d['requests']} requests with distinct {d['size']}x{d['size']} images under "
        f"--cache-bytes {d['cache_bytes']}: statuses {d['statuses']}, {d['seconds']:.0f} s; the "
        f"process grew by {d['growth_mb']:.0f} MB (peak {d['peak_growth_mb']:.0f} MB); /health: "
        f"{d['cache']}.",
    ]
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--scale", type=click.Choice(["tiny", "small"]), default="tiny", show_default=True)
@click.option(
    "--model",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A servable model folder instead of synthetic weights.",
)
@click.option("--images", type=click.IntRange(1), default=8, show_default=True)
@click.option("--size", type=click.IntRange(28), default=8192, show_default=True)
@click.option("--small-pixels", type=click.IntRange(3136), default=28 * 28 * 64, show_default=True)
@click.option("--text-mb", type=click.FloatRange(0.001), default=60.0, show_default=True)
@click.option("--distinct", type=click.IntRange(1), default=40, show_default=True)
@click.option("--distinct-size", type=click.IntRange(28), default=896, show_default=True)
@click.option("--cache-bytes", default="64MiB", show_default=True)
@click.option("--long-answer", type=click.IntRange(1), default=4000, show_default=True)
@click.option("--openblas/--no-openblas", default=None, help="Preload the system OpenBLAS.")
@click.option("--out", type=click.Path(path_type=Path), help="Output folder.")
@click.option("--cache", type=click.Path(path_type=Path), default=CACHE, show_default=True)
def main(scale, model, openblas, out, cache, **settings) -> None:
    """Measure what hostile requests cost `mimo-mlx serve` on 127.0.0.1."""
    log = lambda message: click.echo(message, err=True)  # noqa: E731
    started = datetime.now(timezone.utc)
    preload = server_preload(openblas, log)
    model, name, weights = served_model(model, cache, scale, log)
    out = out or REPO / "benchmarks" / "results" / f"serve-safety-{name}-{started:%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    results = run_all(model, out, preload, settings)
    report = {
        "benchmark": "serve_safety",
        "started_utc": started.isoformat(timespec="seconds"),
        **provenance("benchmarks.serve_safety"),
        "settings": {
            "weights": weights,
            "openblas_preload": preload,
            **settings,
        },
        "results": results,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(markdown(report))
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}")
    click.echo(markdown(report))
    failures = [s for s in _statuses(results) if s >= 500 and s != 503]
    if failures:
        raise click.ClickException(f"server errors: {failures}")


def _statuses(results: dict) -> list[int]:
    found = [item["status"] for item in results["huge_images"]]
    found += [item["status"] for item in results["huge_images_queue_full"].values()]
    return [*found, results["huge_text"]["status"], *results["distinct_images"]["statuses"]]


if __name__ == "__main__":
    main()
