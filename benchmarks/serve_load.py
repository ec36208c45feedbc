"""A bounded load run against `mimo-mlx serve` on 127.0.0.1 (see benchmarks/README.md).

    python -m benchmarks.serve_load --scale tiny                  # synthetic weights, seconds
    python -m benchmarks.serve_load --scale small --requests 64 --concurrency 4
    python -m benchmarks.serve_load --model ~/models/mimo-vl-7b-rl-4bit

Starts the server as a subprocess on a free local port, then sends a fixed number of chat
completions (an image and a question each; streamed, greedy, a fixed token budget) with a fixed
number in flight at once, and reports requests/s, generated tokens/s, p50/p95 time to first token
and latency, the errors (there must be none: the command fails otherwise) and the server's peak
memory. Writes results.json and results.md like the harness. The server generates one request at
a time (see mimo_mlx/serve/engine.py): concurrency shows as queueing in TTFT, not as batching.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import click
import httpx2
import numpy as np
from PIL import Image

from .machine import REPO, git_state, machine_info, versions
from .multiturn import CHATML, EOS, byte_level_tokenizer
from .settings import CACHE, OPENBLAS, openblas_warning
from .stats import summarize
from .weights import prepare

QUESTIONS = (
    "Describe this picture in detail.",
    "What colour is the largest object?",
    "Is there any text in the image? Read it.",
    "How many distinct shapes can you see?",
)
START_TIMEOUT_S = 600


def chat_folder(source: Path, folder: Path) -> Path:
    """A servable folder over a synthetic conversion: its weights and config linked, with a
    byte-level tokenizer whose special tokens sit at the config's ids and Qwen's ChatML template
    (as `multiturn.chat_processor` builds them, written to files for the server to load)."""
    folder.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name in ("config.json", "model.safetensors.index.json") or item.suffix == (
            ".safetensors"
        ):
            link = folder / item.name
            link.unlink(missing_ok=True)
            link.symlink_to(item.resolve())
    config = json.loads((source / "config.json").read_text())
    byte_level_tokenizer(config).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    (folder / "chat_template.jinja").write_text(CHATML)
    return folder


def picture_url(size: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 256, (size // 16 + 1, size // 16 + 1, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(smooth).resize((size, size), Image.BILINEAR).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class Server:
    """`mimo-mlx serve` on a free 127.0.0.1 port, its log in `log_path`; RSS sampled."""

    def __init__(self, folder: Path, log_path: Path, flags: list[str], preload: str | None):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        if preload:
            env["LD_PRELOAD"] = preload
        command = [sys.executable, "-m", "mimo_mlx", "serve", "--model", str(folder)]
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(
                [*command, "--port", str(self.port), *flags],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )
        self.log_path, self.peak_rss = log_path, 0
        self._sampling = True

    def wait_until_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise click.ClickException(
                    f"the server exited:\n{self.log_path.read_text()[-3000:]}"
                )
            try:
                if httpx2.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx2.HTTPError:
                pass
            time.sleep(0.2)
        raise click.ClickException(f"the server did not come up in {START_TIMEOUT_S} s")

    def sample_rss(self) -> None:
        """Record the server's peak resident memory until `stop` (psutil, when installed)."""
        try:
            import psutil
        except ImportError:
            self.peak_rss = None
            return
        process = psutil.Process(self.process.pid)

        def loop() -> None:
            while self._sampling and self.process.poll() is None:
                try:
                    self.peak_rss = max(self.peak_rss, process.memory_info().rss)
                except psutil.Error:
                    return
                time.sleep(0.05)

        threading.Thread(target=loop, daemon=True).start()

    def health(self) -> dict:
        return httpx2.get(self.url + "/health", timeout=30).json()

    def stop(self) -> None:
        self._sampling = False
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def one_request(http: httpx2.AsyncClient, body: dict) -> dict:
    """Send one streamed completion; its TTFT, latency, tokens, or the error."""
    started = time.perf_counter()
    first = None
    usage, finish, error = None, None, None
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return {"error": f"HTTP {response.status_code}: {response.text[:300]}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                first = first or time.perf_counter()
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"].get("message")
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices", ()):
                    finish = choice.get("finish_reason") or finish
    except (httpx2.HTTPError, json.JSONDecodeError) as err:
        return {"error": f"{type(err).__name__}: {err}"}
    if error or usage is None or first is None:
        return {"error": error or "the stream ended without usage"}
    return {
        "ttft_s": first - started,
        "latency_s": time.perf_counter() - started,
        "completion_tokens": usage["completion_tokens"],
        "prompt_tokens": usage["prompt_tokens"],
        "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
        "finish_reason": finish,
    }


def request_body(index: int, images: list[str], max_tokens: int) -> dict:
    question = f"{QUESTIONS[index % len(QUESTIONS)]} (request {index})"
    content = [{"type": "image_url", "image_url": {"url": images[index % len(images)]}}]
    return {
        "messages": [{"role": "user", "content": [*content, {"type": "text", "text": question}]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def load(
    url: str, bodies: list[dict], concurrency: int, timeout: float
) -> tuple[list, float]:
    """Every body sent, `concurrency` at a time; (results in order, wall seconds)."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx2.Limits(max_connections=concurrency)
    async with httpx2.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:

        async def gated(body: dict) -> dict:
            async with gate:
                return await one_request(http, body)

        started = time.perf_counter()
        results = await asyncio.gather(*(gated(body) for body in bodies))
        return results, time.perf_counter() - started


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, **summarize(values)}
    p50, p95 = np.percentile(values, [50, 95]).tolist()
    return {"p50": p50, "p95": p95, **summarize(values)}


def summarize_run(results: list[dict], wall_s: float) -> dict:
    done = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    tokens = sum(r["completion_tokens"] for r in done)
    return {
        "requests": len(results),
        "completed": len(done),
        "errors": len(errors),
        "error_samples": errors[:5],
        "wall_s": wall_s,
        "requests_per_s": len(done) / wall_s,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall_s,
        "ttft_s": percentiles([r["ttft_s"] for r in done]),
        "latency_s": percentiles([r["latency_s"] for r in done]),
        "prompt_tokens_mean": float(np.mean([r["prompt_tokens"] for r in done])) if done else None,
        "cached_tokens_mean": float(np.mean([r["cached_tokens"] for r in done])) if done else None,
        "finish_reasons": {
            reason: sum(r["finish_reason"] == reason for r in done)
            for reason in sorted({r["finish_reason"] for r in done})
        },
    }


def markdown(report: dict) -> str:
    s, r = report["settings"], report["results"]
    machine = report["machine"]
    commit = (report["git"]["commit"] or "unknown")[:12]
    dirty = " (uncommitted changes)" if report["git"]["dirty"] else ""

    def ms(entry: dict, key: str) -> str:
        return "-" if entry[key] is None else f"{1000 * entry[key]:.0f}"

    rss = r["server_peak_rss_gb"]
    lines = [
        f"# mimo-mlx serve under load: {s['weights']}",
        "",
        f"`{report['command']}` at {report['started_utc']}, commit `{commit}`{dirty}",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gb']} GB RAM, "
        f"{machine['os']}. MLX {report['versions'].get('mlx')}; OpenBLAS preloaded: "
        f"{s['openblas_preload'] or 'no'}.",
        f"{s['requests']} requests, {s['concurrency']} in flight, each one {s['image_size']}x"
        f"{s['image_size']} image (of {s['distinct_images']} distinct) and a question, streamed, "
        f"greedy, at most {s['max_tokens']} tokens; {s['warmup']} warm-up requests before.",
        "",
        "| requests/s | tokens/s | TTFT p50 ms | TTFT p95 ms | latency p50 ms | latency p95 ms "
        "| errors | MLX peak GB | server RSS peak GB |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | {ms(r['ttft_s'], 'p50')} | "
        f"{ms(r['ttft_s'], 'p95')} | {ms(r['latency_s'], 'p50')} | {ms(r['latency_s'], 'p95')} | "
        f"{r['errors']} | {r['server']['peak_memory_gb']:.2f} | "
        f"{'-' if rss is None else f'{rss:.2f}'} |",
        "",
        f"{r['completed']} of {r['requests']} completed in {r['wall_s']:.1f} s, "
        f"{r['completion_tokens']} tokens generated (finish reasons: {r['finish_reasons']}); "
        f"prompts averaged {r['prompt_tokens_mean'] or 0:.0f} tokens, "
        f"{r['cached_tokens_mean'] or 0:.0f} of them reused from the server's cache. TTFT is "
        "the time to the first streamed event, queueing included; tokens/s counts generated "
        "tokens over the whole run. MLX peak: the most any request needed "
        "(`mx.get_peak_memory`, weights included); RSS sampled every 50 ms (psutil).",
        f"Server counts afterwards: {r['server']['requests']}.",
    ]
    if r["error_samples"]:
        lines += ["", "Errors (first few):", *[f"- {e}" for e in r["error_samples"]]]
    return "\n".join(lines) + "\n"


@click.command()
@click.option(
    "--scale",
    type=click.Choice(["tiny", "small", "full"]),
    default="tiny",
    show_default=True,
    help="Synthetic weights (drawn once into the cache, as the harness does).",
)
@click.option(
    "--model",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A servable model folder (with tokenizer and chat template) instead of synthetic weights.",
)
@click.option("--requests", "count", type=click.IntRange(1), default=64, show_default=True)
@click.option("--concurrency", type=click.IntRange(1), default=4, show_default=True)
@click.option("--max-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option("--image-size", type=click.IntRange(28), default=224, show_default=True)
@click.option("--distinct-images", type=click.IntRange(1), default=4, show_default=True)
@click.option("--warmup", type=click.IntRange(0), default=2, show_default=True)
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Per request, s.")
@click.option("--openblas/--no-openblas", default=None, help="Preload the system OpenBLAS.")
@click.option("--out", type=click.Path(path_type=Path), help="Output folder.")
@click.option("--cache", type=click.Path(path_type=Path), default=CACHE, show_default=True)
def main(
    scale, model, count, concurrency, max_tokens, image_size, distinct_images, warmup, timeout,
    openblas, out, cache,
) -> None:  # fmt: skip
    """Load-test `mimo-mlx serve` on 127.0.0.1 with concurrent streamed requests."""
    log = lambda message: click.echo(message, err=True)  # noqa: E731
    started = datetime.now(timezone.utc)
    linux = sys.platform.startswith("linux")
    if warning := openblas_warning(linux, openblas):
        log(warning)
    preload = OPENBLAS if linux and openblas is not False and Path(OPENBLAS).is_file() else None
    synthetic = model is None
    if synthetic:
        converted = prepare(cache, scale, ["mimo-mlx"], ["float"], log=log)
        model = chat_folder(converted.paths[("mimo-mlx", "float")].folder, cache / scale / "serve")
    name = scale if synthetic else model.name
    out = out or REPO / "benchmarks" / "results" / f"serve-{name}-{started:%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    flags = ["--queue-size", str(max(concurrency, 1)), "--request-timeout", str(timeout)]
    server = Server(model, out / "server.log", flags, preload)
    try:
        server.wait_until_up()
        images = [picture_url(image_size, seed) for seed in range(distinct_images)]
        bodies = [request_body(i, images, max_tokens) for i in range(count)]
        warm = [request_body(count + i, images, max_tokens) for i in range(warmup)]
        log(f"server up at {server.url}; {warmup} warm-up requests, then {count} requests")
        asyncio.run(load(server.url, warm, 1, timeout))
        server.sample_rss()
        results, wall_s = asyncio.run(load(server.url, bodies, concurrency, timeout))
        summary = summarize_run(results, wall_s)
        summary["per_request"] = results
        summary["server"] = server.health()
        summary["server_peak_rss_gb"] = server.peak_rss / 1e9 if server.peak_rss else None
    finally:
        server.stop()
    report = {
        "benchmark": "serve_load",
        "started_utc": started.isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.serve_load", *sys.argv[1:]]),
        "git": git_state(),
        "machine": machine_info(),
        "versions": versions(),
        "settings": {
            "weights": f"synthetic `{scale}` ({model})" if synthetic else str(model),
            "requests": count,
            "concurrency": concurrency,
            "max_tokens": max_tokens,
            "image_size": image_size,
            "distinct_images": distinct_images,
            "warmup": warmup,
            "timeout_s": timeout,
            "openblas_preload": preload,
            "server_flags": flags,
        },
        "results": summary,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(markdown(report))
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}")
    click.echo(markdown(report))
    if summary["errors"]:
        raise click.ClickException(f"{summary['errors']} of {count} requests failed")


if __name__ == "__main__":
    main()
