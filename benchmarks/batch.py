"""What batching buys: the decode step's cost by batch size, and the library's batch API against a
loop of solo calls (see benchmarks/README.md).

    python -m benchmarks.batch --scale small --out /tmp/batch
    python -m benchmarks.batch --scale tiny --sizes 1,2 --prompts 1,2     # seconds

1. The batch-size curve, float and 4-bit: one decode step for B sequences together (B rows of a
   `BatchCache`, each holding `--context` tokens), timed for B in `--sizes`, the sizes and the
   variants interleaved round by round in one process. Decoding reads every weight once whatever
   B is, so a step should cost little more for 8 rows than for 1, except where a kernel reads the
   weights once per row (MLX's 4-bit `quantized_matmul` for 2-8 rows: ml-explore/mlx#4265).
2. `batch_generate` against `stream_generate` called once per prompt, for N prompts in
   `--prompts` (each one `--image-size` image and a question, greedy, `--max-tokens` tokens),
   alternating: wall time, prompts/s and generated tokens/s over it, each sequence's time to its
   first token (from the call's start), the 95th percentile of the gaps between a sequence's
   tokens, and the peak memory. The answers must agree token for token.

The weights are the harness's synthetic conversions at `--scale` (made once in the cache) with a
byte-level tokenizer and ChatML template beside them, as `serve_load` serves. On Linux the system
OpenBLAS is preloaded (the command re-runs itself with it) unless `--no-openblas`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import click
import mlx.core as mx
import numpy as np

import mimo_mlx
from mimo_mlx.generation.batch import batch_generate
from mimo_mlx.generation.loop import collect
from mimo_mlx.model.batch_cache import BatchCache

from .machine import REPO, provenance
from .serve_client import QUESTIONS
from .serve_load import chat_folder
from .settings import CACHE, OPENBLAS, openblas_preload
from .stats import summarize
from .weights import on_disk, prepare


def step_costs(models: dict, sizes: list[int], context: int, rounds: int, steps: int) -> dict:
    """Seconds per decode step, per variant and batch size: `steps` steps a round, rounds
    interleaved over sizes and variants, after one untimed round."""
    rng = np.random.default_rng(0)
    times: dict[str, dict[int, list[float]]] = {v: {b: [] for b in sizes} for v in models}
    prefilled = {}  # each variant's rows, prefilled once; every batch takes copies
    for variant, model in models.items():
        prefilled[variant] = []
        for _ in range(max(sizes)):
            row = model.make_cache()
            model(rng.integers(0, 256, (1, context)), cache=row)
            mx.eval(row.state)
            prefilled[variant].append(row)
    for round_ in range(rounds + 1):
        for variant, model in models.items():
            for size in sizes:
                cache = BatchCache(len(model.model.layers))
                for row in prefilled[variant][:size]:
                    cache.add(row.copy(context))
                ids = mx.array(rng.integers(0, 256, (size, 1)))
                mx.eval(model(ids, cache=cache))  # warm-up
                for _ in range(steps):
                    started = time.perf_counter()
                    mx.eval(model(ids, cache=cache))
                    if round_:  # the first round warms every shape up
                        times[variant][size].append(time.perf_counter() - started)
    out = {}
    for variant, by_size in times.items():
        one = summarize(by_size[sizes[0]])["median"]
        out[variant] = {
            str(size): {**summarize(values), "relative": summarize(values)["median"] / one}
            for size, values in by_size.items()
        }
    return out


def prompts_for(count: int, images: list[Path], max_tokens: int) -> list[dict]:
    return [
        {
            "prompt": f"{QUESTIONS[i % len(QUESTIONS)]} (prompt {i})",
            "images": [images[i % len(images)]],
            "max_tokens": max_tokens,
        }
        for i in range(count)
    ]


def api_runs(model, processor, counts: list[int], images: list[Path], max_tokens: int) -> list:
    """`batch_generate` and a loop of `stream_generate` for each prompt count, alternating; each
    token's arrival is timed from the call's start."""
    results = []
    for count in counts:
        prompts = prompts_for(count, images, max_tokens)
        for way in ("loop", "batch"):
            arrivals: dict[int, list[float]] = {i: [] for i in range(count)}
            mx.reset_peak_memory()
            started = time.perf_counter()

            def arrived(index: int, _response, start: float = started, times=arrivals) -> None:
                times[index].append(time.perf_counter() - start)

            if way == "loop":
                answers = []
                for i, request in enumerate(prompts):
                    steps = mimo_mlx.stream_generate(model, processor, **request)
                    answers.append(collect(steps, on_text=lambda _, i=i: arrived(i, None)))
            else:
                answers = batch_generate(
                    model, processor, prompts, max_batch=count, on_response=arrived
                )
            wall = time.perf_counter() - started
            tokens = sum(len(a.tokens) for a in answers)
            firsts = [times[0] for times in arrivals.values()]
            gaps = np.concatenate([np.diff(times) for times in arrivals.values()])
            results.append({
                "prompts": count,
                "way": way,
                "wall_s": wall,
                "requests_per_s": count / wall,
                "tokens": tokens,
                "tokens_per_s": tokens / wall,
                "ttft_p50_s": float(np.percentile(firsts, 50)),
                "ttft_p95_s": float(np.percentile(firsts, 95)),
                "inter_token_p95_s": float(np.percentile(gaps, 95)) if gaps.size else None,
                "peak_memory_gb": mx.get_peak_memory() / 1e9,
                "answers": [a.tokens for a in answers],
            })  # fmt: skip
    return results


def markdown(report: dict) -> str:
    s, r = report["settings"], report["results"]
    machine, load = report["machine"], report["load_average"]
    lines = [
        f"# Batching: {s['weights']}",
        "",
        f"`{report['command']}` at {report['started_utc']}, commit "
        f"`{(report['git']['commit'] or 'unknown')[:12]}`"
        f"{' (uncommitted changes)' if report['git']['dirty'] else ''}",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gb']} GB RAM. MLX "
        f"{report['versions'].get('mlx')}; OpenBLAS preloaded: {s['openblas_preload'] or 'no'}. "
        f"Load average (1 min) at the start {load['start']:.1f}, at the end {load['end']:.1f}.",
        "",
        f"Decode step by batch size ({s['context']} cached tokens per row; median of "
        f"{s['rounds']} x {s['steps']} steps, interleaved), relative to one row:",
        "",
        "| variant | " + " | ".join(f"B={b}" for b in s["sizes"]) + " |",
        "|---|" + "---|" * len(s["sizes"]),
    ]
    for variant, by_size in r["step_costs"].items():
        cells = [
            f"{1000 * by_size[str(b)]['median']:.1f} ms ({by_size[str(b)]['relative']:.2f}x)"
            for b in s["sizes"]
        ]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"`batch_generate` against a loop of `stream_generate` (float; each prompt one "
        f"{s['image_size']}x{s['image_size']} image and a question, greedy, {s['max_tokens']} "
        "tokens; TTFT counted from the call's start; errors: none, or the run would have "
        "stopped):",
        "",
        "| prompts | way | wall s | requests/s | tokens/s | TTFT p50 / p95 ms | inter-token p95 "
        "ms | peak GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in r["api"]:
        gap = run.get("inter_token_p95_s")  # runs before it was measured lack it
        lines.append(
            f"| {run['prompts']} | {run['way']} | {run['wall_s']:.2f} "
            f"| {run.get('requests_per_s', run['prompts'] / run['wall_s']):.2f} "
            f"| {run['tokens_per_s']:.1f} "
            f"| {1000 * run['ttft_p50_s']:.0f} / {1000 * run['ttft_p95_s']:.0f} "
            f"| {'' if gap is None else f'{1000 * gap:.0f}'} | {run['peak_memory_gb']:.2f} |"
        )
    lines += ["", f"Answers agree token for token: {r['answers_agree']}."]
    return "\n".join(lines) + "\n"


def _numbers(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise click.BadParameter(f"{text!r}: give positive integers, e.g. 1,2,4,8")
    return values


@click.command()
@click.option("--scale", type=click.Choice(["tiny", "small", "full"]), default="small")
@click.option("--sizes", default="1,2,3,4,5,6,7,8", show_default=True, help="Batch sizes.")
@click.option("--variants", default="float,4bit", show_default=True)
@click.option("--context", type=click.IntRange(1), default=256, show_default=True)
@click.option("--rounds", type=click.IntRange(1), default=3, show_default=True)
@click.option("--steps", type=click.IntRange(1), default=5, show_default=True)
@click.option("--prompts", default="1,2,4,8", show_default=True, help="Prompt counts.")
@click.option("--max-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option("--image-size", type=click.IntRange(28), default=224, show_default=True)
@click.option("--openblas/--no-openblas", default=None, help="Preload the system OpenBLAS.")
@click.option("--out", type=click.Path(path_type=Path), help="Output folder.")
@click.option("--cache", type=click.Path(path_type=Path), default=CACHE, show_default=True)
def main(
    scale, sizes, variants, context, rounds, steps, prompts, max_tokens, image_size, openblas,
    out, cache,
) -> None:  # fmt: skip
    """The decode step's cost by batch size, and batch_generate against a loop of stream_generate."""
    preload = openblas_preload(openblas, mx.default_device() == mx.cpu)
    if preload and os.environ.get("LD_PRELOAD") != OPENBLAS:  # it must be there from the start
        env = {**os.environ, "LD_PRELOAD": OPENBLAS}
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.batch", *sys.argv[1:]], env)
    log = lambda message: click.echo(message, err=True)  # noqa: E731
    sizes, counts = _numbers(sizes), _numbers(prompts)
    variants = [v.strip() for v in variants.split(",") if v.strip()]
    started = datetime.now(timezone.utc)
    load_start = os.getloadavg()[0]
    out = out or REPO / "benchmarks" / "results" / f"batch-{scale}-{started:%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    converted = prepare(cache, scale, ["mimo-mlx"], variants, log=log)
    loaded = {
        v: mimo_mlx.load(
            chat_folder(
                on_disk(converted.paths[("mimo-mlx", v)], cache, log), cache / scale / f"chat-{v}"
            )
        )
        for v in variants
    }
    log(f"decode step by batch size: {sizes}, {variants}")
    costs = step_costs({v: m for v, (m, _) in loaded.items()}, sizes, context, rounds, steps)
    images = [_picture(out / f"image{i}.png", image_size, i) for i in range(4)]
    model, processor = loaded["float" if "float" in loaded else variants[0]]
    log(f"batch_generate against a loop of stream_generate: {counts} prompts")
    api = api_runs(model, processor, counts, images, max_tokens)
    by_count = {}
    for run in api:
        by_count.setdefault(run["prompts"], []).append(run.pop("answers"))
    agree = all(loop == batch for loop, batch in by_count.values())
    report = {
        "benchmark": "batch",
        "started_utc": started.isoformat(timespec="seconds"),
        **provenance("benchmarks.batch"),
        "load_average": {"start": load_start, "end": os.getloadavg()[0]},
        "settings": {
            "weights": f"synthetic `{scale}`",
            "sizes": sizes,
            "variants": variants,
            "context": context,
            "rounds": rounds,
            "steps": steps,
            "prompts": counts,
            "max_tokens": max_tokens,
            "image_size": image_size,
            "openblas_preload": preload,
        },
        "results": {"step_costs": costs, "api": api, "answers_agree": agree},
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(markdown(report))
    click.echo(markdown(report))
    if not agree:
        raise click.ClickException("batch_generate and generate gave different answers")


def _picture(path: Path, size: int, seed: int) -> Path:
    from PIL import Image  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 256, (size // 16 + 1, size // 16 + 1, 3), dtype=np.uint8)
    Image.fromarray(smooth).resize((size, size), Image.BILINEAR).save(path)
    return path


if __name__ == "__main__":
    main()
