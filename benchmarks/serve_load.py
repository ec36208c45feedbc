"""A bounded load run against `mimo-mlx serve` on 127.0.0.1 (see benchmarks/README.md).

    python -m benchmarks.serve_load --scale tiny                  # synthetic weights, seconds
    python -m benchmarks.serve_load --scale small --clients 1,2,4,8 --max-batch 1,4
    python -m benchmarks.serve_load --model ~/models/mimo-vl-7b-rl-4bit

Starts one server subprocess per `--max-batch` value (1: one request at a time; more: batched),
each on a free local port, then for each client count sends a fixed number of chat completions (an
image and a question each; streamed, greedy, a fixed token budget) with that many in flight, to
each server in turn (interleaved, so a machine shared with other work loads both alike). Reports
requests/s, generated tokens/s, p50/p95 time to first token and latency, p50/p95 time between
tokens, errors (there must be none: the command fails otherwise) and peak memory, and the batched
servers' figures as ratios of the one-at-a-time server's. A probe then measures, per server, how
much a running answer's time between tokens grows while a video request is prefilled.
Writes results.json and results.md like the harness.
"""

from __future__ import annotations

import asyncio
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

from .machine import REPO, provenance
from .multiturn import CHATML, EOS, byte_level_tokenizer
from .serve_client import gaps, load, picture_url, probe_run, request_body, video_frames
from .settings import CACHE, OPENBLAS, openblas_warning
from .stats import summarize
from .weights import prepare

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


def synthetic_server_folder(cache: Path, scale: str, log) -> Path:
    """A servable folder over the harness's synthetic float checkpoint at `scale` (drawn once
    into `cache`)."""
    converted = prepare(cache, scale, ["mimo-mlx"], ["float"], log=log)
    return chat_folder(converted.paths[("mimo-mlx", "float")].folder, cache / scale / "serve")


def served_model(model: Path | None, cache: Path, scale: str, log) -> tuple[Path, str, str]:
    """What a server benchmark serves: `model`, or the synthetic folder at `scale`; with the name
    its results folder takes and what its report says of the weights."""
    if model is not None:
        return model, model.name, str(model)
    folder = synthetic_server_folder(cache, scale, log)
    return folder, scale, f"synthetic `{scale}` ({folder})"


def server_preload(openblas: bool | None, log) -> str | None:
    """The system OpenBLAS to preload into a server on Linux (warned about where missing)."""
    linux = sys.platform.startswith("linux")
    if warning := openblas_warning(linux, openblas):
        log(warning)
    return OPENBLAS if linux and openblas is not False and Path(OPENBLAS).is_file() else None


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


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, **summarize(values)}
    p50, p95 = np.percentile(values, [50, 95]).tolist()
    return {"p50": p50, "p95": p95, **summarize(values)}


def summarize_run(results: list[dict], wall_s: float) -> dict:
    done = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    tokens = sum(r["completion_tokens"] for r in done)
    between = [g for r in done for g in gaps(r["arrivals_s"])]
    inter = percentiles(between)
    inter.pop("values")  # every gap of every request: too many to keep
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
        "inter_token_s": inter,
        "prompt_tokens_mean": float(np.mean([r["prompt_tokens"] for r in done])) if done else None,
        "cached_tokens_mean": float(np.mean([r["cached_tokens"] for r in done])) if done else None,
        "finish_reasons": {
            reason: sum(r["finish_reason"] == reason for r in done)
            for reason in sorted({r["finish_reason"] for r in done})
        },
    }


def ratios(runs: list[dict]) -> list[dict]:
    """Each batched server's figures over the one-at-a-time server's, per client count."""
    base = {r["clients"]: r for r in runs if r["max_batch"] == 1}
    out = []
    for run in runs:
        alone = base.get(run["clients"])
        if run["max_batch"] == 1 or alone is None or not alone["tokens_per_s"]:
            continue
        p95, alone_p95 = run["ttft_s"]["p95"], alone["ttft_s"]["p95"]
        out.append({
            "max_batch": run["max_batch"],
            "clients": run["clients"],
            "tokens_per_s": run["tokens_per_s"] / alone["tokens_per_s"],
            "ttft_p95": p95 / alone_p95 if p95 and alone_p95 else None,
        })  # fmt: skip
    return out


def markdown(report: dict) -> str:
    s, r = report["settings"], report["results"]
    machine = report["machine"]
    commit = (report["git"]["commit"] or "unknown")[:12]
    dirty = " (uncommitted changes)" if report["git"]["dirty"] else ""

    def ms(value) -> str:
        return "-" if value is None else f"{1000 * value:.0f}"

    lines = [
        f"# mimo-mlx serve under load: {s['weights']}",
        "",
        f"`{report['command']}` at {report['started_utc']}, commit `{commit}`{dirty}",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gb']} GB RAM, "
        f"{machine['os']}. MLX {report['versions'].get('mlx')}; OpenBLAS preloaded: "
        f"{s['openblas_preload'] or 'no'}. Load average (1 min) at the start "
        f"{report['load_average']['start']:.1f}, at the end {report['load_average']['end']:.1f}.",
        f"Per run: {s['requests']} requests, each one {s['image_size']}x{s['image_size']} image "
        f"(of {s['distinct_images']} distinct) and a question, streamed, greedy, at most "
        f"{s['max_tokens']} tokens; {s['warmup']} warm-up requests per server first. Servers "
        "interleaved: for each client count, each server in turn.",
        "",
        "| --max-batch | clients | requests/s | tokens/s | TTFT p50 ms | TTFT p95 ms | "
        "inter-token p50 ms | inter-token p95 ms | errors | MLX peak GB | RSS peak GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in r["runs"]:
        rss = run["server_peak_rss_gb"]
        lines.append(
            f"| {run['max_batch']} | {run['clients']} | {run['requests_per_s']:.2f} | "
            f"{run['tokens_per_s']:.1f} | {ms(run['ttft_s']['p50'])} | {ms(run['ttft_s']['p95'])} "
            f"| {ms(run['inter_token_s']['p50'])} | {ms(run['inter_token_s']['p95'])} | "
            f"{run['errors']} | {run['mlx_peak_gb']:.2f} | {'-' if rss is None else f'{rss:.2f}'} |"
        )
    if r["ratios"]:
        lines += [
            "",
            "| --max-batch | clients | tokens/s vs one at a time | TTFT p95 vs one at a time |",
        ]
        lines += ["|---|---|---|---|"]
        for ratio in r["ratios"]:
            ttft = "-" if ratio["ttft_p95"] is None else f"{ratio['ttft_p95']:.2f}x"
            lines.append(
                f"| {ratio['max_batch']} | {ratio['clients']} | {ratio['tokens_per_s']:.2f}x | {ttft} |"
            )
    if r["probe"]:
        lines += [
            "",
            f"Probe: a text answer of {s['probe_tokens']} tokens runs; after its 8th token a video "
            f"of {s['probe_frames']} {s['probe_size']}x{s['probe_size']} frames arrives. The "
            "running answer's time between tokens before, and the longest while the video was "
            "read, encoded and prefilled (until its first token):",
            "",
            "| --max-batch | video prompt tokens | video TTFT ms | running gap before p50 ms | "
            "longest gap during ms | gaps during | gaps over twice the one before, in order, ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for batch, p in r["probe"].items():
            if "error" in p:
                lines.append(f"| {batch} | error: {p['error']} | | | | | |")
                continue
            long = [g for g in p.get("gaps_during_s", []) if g > 2 * p["gap_before_p50_s"]]
            lines.append(
                f"| {batch} | {p['video_prompt_tokens']} | {ms(p['video_ttft_s'])} | "
                f"{ms(p['gap_before_p50_s'])} | {ms(p['gap_during_max_s'])} | {p['gaps_during']} "
                f"| {', '.join(ms(g) for g in long)} |"
            )
    lines += [
        "",
        "TTFT: request sent to its first streamed event (after the first token), queueing "
        "included. Inter-token: time between consecutive token events of one stream (the "
        "requests ask for log-probabilities, so each token is one event), over every stream of "
        "the run. tokens/s: generated tokens over the run's wall time. MLX peak: the server's "
        "`mx.get_peak_memory` after the run (the most since it started, weights included); RSS "
        "sampled every 50 ms during the run (psutil).",
        f"Server counts afterwards: {r['counts']}.",
    ]
    errors = [e for run in r["runs"] for e in run["error_samples"]]
    if errors:
        lines += ["", "Errors (first few):", *[f"- {e}" for e in errors[:5]]]
    return "\n".join(lines) + "\n"


def _numbers(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"{text!r}: give positive integers, e.g. 1,2,4,8")
    return values


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
@click.option(
    "--clients", default="1,2,4,8", show_default=True, help="Requests in flight, per run."
)
@click.option(
    "--max-batch",
    "batches",
    default="1,4",
    show_default=True,
    help="One server per value (1: one request at a time, the baseline of the ratios).",
)
@click.option(
    "--requests", "count", type=click.IntRange(1), default=16, show_default=True, help="Per run."
)
@click.option("--max-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option("--image-size", type=click.IntRange(28), default=224, show_default=True)
@click.option("--distinct-images", type=click.IntRange(1), default=4, show_default=True)
@click.option("--warmup", type=click.IntRange(0), default=2, show_default=True)
@click.option("--probe/--no-probe", default=True, show_default=True, help="The video probe.")
@click.option("--probe-frames", type=click.IntRange(2), default=8, show_default=True)
@click.option("--probe-size", type=click.IntRange(28), default=448, show_default=True)
@click.option("--probe-tokens", type=click.IntRange(16), default=96, show_default=True)
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Per request, s.")
@click.option("--openblas/--no-openblas", default=None, help="Preload the system OpenBLAS.")
@click.option("--out", type=click.Path(path_type=Path), help="Output folder.")
@click.option("--cache", type=click.Path(path_type=Path), default=CACHE, show_default=True)
def main(
    scale, model, clients, batches, count, max_tokens, image_size, distinct_images, warmup, probe,
    probe_frames, probe_size, probe_tokens, timeout, openblas, out, cache,
) -> None:  # fmt: skip
    """Load-test `mimo-mlx serve` on 127.0.0.1: batched and one-at-a-time servers, interleaved."""
    log = lambda message: click.echo(message, err=True)  # noqa: E731
    clients, batches = _numbers(clients), sorted(set(_numbers(batches)))
    started = datetime.now(timezone.utc)
    load_start = os.getloadavg()[0]
    preload = server_preload(openblas, log)
    model, name, weights = served_model(model, cache, scale, log)
    out = out or REPO / "benchmarks" / "results" / f"serve-{name}-{started:%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    frames = video_frames(out / "video", probe_frames, probe_size) if probe else None
    servers: dict[int, Server] = {}
    runs, probes, counts = [], {}, {}
    try:
        for batch in batches:
            flags = ["--max-batch", str(batch), "--queue-size", str(max(clients))]
            flags += ["--request-timeout", str(timeout)]
            if frames is not None:  # the probe's video: a folder of frames under `out`
                flags += ["--allow-local-files", str(out)]
            servers[batch] = Server(model, out / f"server-max-batch-{batch}.log", flags, preload)
        images = [picture_url(image_size, seed) for seed in range(distinct_images)]
        for server in servers.values():
            server.wait_until_up()
            server.sample_rss()
            warm = [request_body(10_000 + i, images, max_tokens) for i in range(warmup)]
            asyncio.run(load(server.url, warm, 1, timeout))
        log(f"servers up: {', '.join(s.url for s in servers.values())}")
        for n, concurrent in enumerate(clients):
            bodies = [request_body(1000 * n + i, images, max_tokens) for i in range(count)]
            for batch, server in servers.items():
                log(f"--max-batch {batch}: {count} requests, {concurrent} in flight")
                server.peak_rss = 0
                results, wall_s = asyncio.run(load(server.url, bodies, concurrent, timeout))
                summary = summarize_run(results, wall_s)
                health = server.health()
                summary.update(
                    max_batch=batch,
                    clients=concurrent,
                    per_request=results,
                    mlx_peak_gb=health["peak_memory_gb"],
                    server_peak_rss_gb=server.peak_rss / 1e9 if server.peak_rss else None,
                )
                runs.append(summary)
        for batch, server in servers.items():
            if probe:
                log(f"--max-batch {batch}: probe")
                probes[batch] = asyncio.run(probe_run(server.url, frames, probe_tokens, timeout))
            counts[batch] = server.health()["requests"]
    finally:
        for server in servers.values():
            server.stop()
    report = {
        "benchmark": "serve_load",
        "started_utc": started.isoformat(timespec="seconds"),
        **provenance("benchmarks.serve_load"),
        "load_average": {"start": load_start, "end": os.getloadavg()[0]},
        "settings": {
            "weights": weights,
            "requests": count,
            "clients": clients,
            "max_batch": batches,
            "max_tokens": max_tokens,
            "image_size": image_size,
            "distinct_images": distinct_images,
            "warmup": warmup,
            "probe_frames": probe_frames,
            "probe_size": probe_size,
            "probe_tokens": probe_tokens,
            "timeout_s": timeout,
            "openblas_preload": preload,
        },
        "results": {"runs": runs, "ratios": ratios(runs), "probe": probes, "counts": counts},
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(markdown(report))
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}")
    click.echo(markdown(report))
    failed = sum(run["errors"] for run in runs) + sum("error" in p for p in probes.values())
    if failed:
        raise click.ClickException(f"{failed} requests failed")


if __name__ == "__main__":
    main()
