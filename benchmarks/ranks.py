"""The several-ranks scenario: mimo-mlx split across 1 and 2 ranks (mlx.launch, ring on 127.0.0.1).

Per rank: weight bytes (in split layers and whole), `mx.get_peak_memory` over a generation (image
and text, greedy), rank 0's time to first token and decode rate; and the vision tower two ways,
split across the ranks or whole on rank 0 with its features sent to the others. The memory check:
each rank's peak within 15% of (1/N of the split weights + the whole ones), the weights measured
on 1 rank. The vision choice: which way is faster here, the bytes each way sends per pass, and the
link speed below which the whole tower on rank 0 would win.

Part of `python -m benchmarks.run` (`--ranks`); alone:

    python -m benchmarks.ranks --scale small --ranks 1,2
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import click

from .machine import REPO
from .report.sections.ranks import ranks_markdown
from .settings import DEFAULTS, MEMORY_SLACK, openblas_preload
from .synthetic import scaled_config

LAUNCHER = Path(sys.executable).with_name("mlx.launch")
RUN_LIMIT_S = 3600


def free_port_block(count: int) -> int:
    """The first of `count` consecutive free ports on 127.0.0.1."""
    for _ in range(100):
        base = random.randrange(20000, 60000 - count)
        try:
            for port in range(base, base + count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free ports on 127.0.0.1")


def run_ranks(
    spec: dict, ranks: int, work: Path, preload: str | None, log, threads: int | None = None
) -> list[dict]:
    """One run of `rank_worker` on `ranks` ranks; each rank's result, or the failure.

    The ranks share this host's cores: each gets `threads` BLAS threads (default: its share of
    the cores), where a BLAS spinning up a thread per core in every rank would oversubscribe."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps({**spec, "out": str(work)}, indent=2))
    command = [sys.executable, "-m", "benchmarks.rank_worker", str(spec_path)]
    if ranks > 1:
        port = str(free_port_block(ranks))
        launch = [str(LAUNCHER), "--backend", "ring", "-n", str(ranks), "--starting-port", port]
        command = [*launch, "--", *command]
    threads = threads or max(1, (os.cpu_count() or 1) // ranks)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads)}
    if preload:
        env["LD_PRELOAD"] = preload
    log(f"  {work.name} ...")
    start = time.perf_counter()
    with open(work / "log.txt", "w") as output:
        try:
            subprocess.run(
                command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT,
                timeout=RUN_LIMIT_S, start_new_session=True,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            pass
    found = [work / f"rank{rank}.json" for rank in range(ranks)]
    if not all(path.is_file() for path in found):  # mlx.launch exits 0 whatever its ranks did
        log(f"  {work.name} FAILED after {time.perf_counter() - start:.0f}s")
        return [
            {"error": "a rank did not finish", "log_tail": (work / "log.txt").read_text()[-2000:]}
        ]
    log(f"  {work.name} done in {time.perf_counter() - start:.0f}s")
    return [json.loads(path.read_text()) for path in found]


def vision_traffic(config: dict, patches: int, ranks: int, itemsize: int) -> dict:
    """Bytes each rank sends per vision pass: split (2 all-reduces of the activations per block,
    1 of the merger's output) and whole on rank 0 (1 all-reduce of the features). A ring
    all-reduce sends 2 (N - 1) / N bytes per byte reduced."""
    vision = config["vision_config"]
    merged = patches // vision["spatial_merge_size"] ** 2
    ring = 2 * (ranks - 1) / ranks
    features = merged * vision["out_hidden_size"] * itemsize
    split = 2 * vision["depth"] * patches * vision["hidden_size"] * itemsize + features
    return {"split_bytes": ring * split, "rank0_broadcast_bytes": ring * features}


def summarize_ranks(runs: dict[str, list[dict]], config: dict, itemsize: int) -> dict:
    """Per run: each rank's memory check against the 1-rank weights; the vision comparison."""
    if any("error" in r for ranks in runs.values() for r in ranks) or "1" not in runs:
        return {}
    refused = {n: ranks[0]["refused"] for n, ranks in runs.items() if "refused" in ranks[0]}
    runs = {n: ranks for n, ranks in runs.items() if n not in refused}
    one = runs["1"][0]["weight_bytes"]
    summary = {"split_weight_bytes": one["split"], "whole_weight_bytes": one["whole"], "runs": {}}
    summary["refused"] = refused
    for n, ranks in runs.items():
        expected = one["split"] / int(n) + one["whole"]
        memory = []
        for rank in ranks:
            peak = rank["generate"]["peak_memory_bytes"]
            memory.append(
                {
                    "rank": rank["rank"],
                    "weight_bytes": rank["weight_bytes"]["split"] + rank["weight_bytes"]["whole"],
                    "expected_bytes": expected,
                    "peak_memory_bytes": peak,
                    "peak_over_expected": peak / expected,
                    "within_slack": peak <= (1 + MEMORY_SLACK) * expected,
                }
            )
        summary["runs"][n] = {"memory": memory, "vision": compare_vision(ranks, config, itemsize)}
    return summary


def compare_vision(ranks: list[dict], config: dict, itemsize: int) -> dict:
    """One run's vision tower split vs whole on rank 0: the slowest rank's medians, the bytes each
    way sends, and the link speed below which the whole tower on rank 0 is faster."""
    split_s = max(r["vision"]["split"]["median"] for r in ranks)
    rank0_s = max(r["vision"]["rank0_broadcast"]["median"] for r in ranks)
    traffic = vision_traffic(config, ranks[0]["vision"]["patches"], len(ranks), itemsize)
    extra = traffic["split_bytes"] - traffic["rank0_broadcast_bytes"]
    return {
        "split_s": split_s,
        "rank0_broadcast_s": rank0_s,
        "faster": "split" if split_s <= rank0_s else "rank0_broadcast",
        **traffic,
        # The split tower sends `extra` bytes more to save (rank0_s - split_s) of compute, as
        # measured here on 127.0.0.1 (bytes nearly free): on a slower link it loses.
        "break_even_bytes_per_s": (
            extra / (rank0_s - split_s) if len(ranks) > 1 and rank0_s > split_s else None
        ),
    }


def measure(
    folders: dict[str, Path], ranks: list[int], options: dict, out: Path, preload, dtype, log
) -> dict:
    """The scenario for each variant's mimo-mlx folder and each group size."""
    results = {}
    for variant, folder in folders.items():
        spec = {
            "folder": str(folder),
            "dtype": dtype,
            "image_size": options["image"],
            "text_tokens": options["text"],
            "decode_tokens": options["decode"],
            "warmup": options["gen_warmup"],
            "runs": options["gen_runs"],
        }
        runs = {
            str(n): run_ranks(spec, n, out / "work" / f"ranks-{variant}-{n}", preload, log)
            for n in ranks
        }
        config = json.loads((folder / "config.json").read_text())
        itemsize = 4 if dtype == "float32" else 2
        results[variant] = {"runs": runs, "summary": summarize_ranks(runs, config, itemsize)}
    return results


def measure_vision_only(
    scale: str, ranks: list[int], options: dict, out: Path, preload, dtype, pin: bool, log
) -> dict:
    """The vision tower split vs whole on rank 0, on random weights at `scale` (no folders);
    with `pin`, one core per rank and single-threaded BLAS, as if each rank had its own host."""
    share = max(ranks)
    spec = {"task": "vision", "scale": scale, "dtype": dtype, "pin": pin, "share": share}
    spec.update(image_size=options["image"], warmup=options["gen_warmup"], runs=options["gen_runs"])
    threads = 1 if pin else None
    runs = {
        str(n): run_ranks(spec, n, out / "work" / f"vision-{n}", preload, log, threads)
        for n in ranks
    }
    if any("error" in r for found in runs.values() for r in found):
        return {"runs": runs}
    config = scaled_config(scale)
    itemsize = 4 if dtype == "float32" else 2
    summary = {n: compare_vision(found, config, itemsize) for n, found in runs.items()}
    if "1" in runs and share > 1:
        summary["compute"] = compare_compute(runs["1"][0], share, config, itemsize)
    return {"settings": spec, "runs": runs, "summary": summary}


def compare_compute(found: dict, share: int, config: dict, itemsize: int) -> dict:
    """From one process: the whole tower vs one rank's share of `share` ranks (no sums), and the
    link speed at which the split tower's extra bytes cost what its smaller share saves."""
    whole_s = found["compute"]["whole"]["median"]
    share_s = found["compute"][f"share_of_{share}"]["median"]
    traffic = vision_traffic(config, found["vision"]["patches"], share, itemsize)
    extra = traffic["split_bytes"] - traffic["rank0_broadcast_bytes"]
    return {
        "ranks": share,
        "whole_s": whole_s,
        "share_s": share_s,
        **traffic,
        "break_even_bytes_per_s": extra / (whole_s - share_s) if whole_s > share_s else None,
        "share_tower_bytes": found["compute"]["share_tower_bytes"],
        "whole_tower_bytes": found["vision"]["split_tower_bytes"],  # a group of one: all of it
    }


@click.command()
@click.option("--scale", type=click.Choice(["tiny", "small", "full"]), default="small")
@click.option("--ranks", default="1,2", show_default=True)
@click.option("--variants", default="float,4bit", show_default=True)
@click.option("--runs", type=int, default=3, show_default=True)
@click.option("--warmup", type=int, default=1, show_default=True)
@click.option("--image-size", type=int, default=448, show_default=True)
@click.option(
    "--vision-only",
    is_flag=True,
    help="Only the vision tower split vs whole on rank 0, on random weights (no folders).",
)
@click.option("--pin", is_flag=True, help="One core per rank, single-threaded BLAS (Linux).")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--cache", type=click.Path(path_type=Path), default=REPO / "benchmarks" / ".cache")
def main(scale, ranks, variants, runs, warmup, image_size, vision_only, pin, out, cache) -> None:
    """The several-ranks scenario alone, on synthetic weights at SCALE."""
    import mlx.core as mx

    from .weights import on_disk, prepare

    log = lambda message: click.echo(message, err=True)  # noqa: E731
    counts = [int(n) for n in ranks.split(",")]
    options = {**DEFAULTS, "image": image_size, "gen_warmup": warmup, "gen_runs": runs}
    cpu = mx.default_device() == mx.cpu
    preload, dtype = openblas_preload(None, cpu), "float32" if cpu else "bfloat16"
    out.mkdir(parents=True, exist_ok=True)
    if vision_only:
        found = measure_vision_only(scale, counts, options, out, preload, dtype, pin, log)
        (out / "vision.json").write_text(json.dumps(found, indent=2) + "\n")
        click.echo(json.dumps(found.get("summary", found), indent=2))
        return
    folders = prepare(cache, scale, ["mimo-mlx"], [v for v in variants.split(",") if v], log=log)
    ours = {v: on_disk(w, cache, log) for (runtime, v), w in folders.paths.items()}
    found = measure(ours, counts, options, out, preload, dtype, log)
    (out / "ranks.json").write_text(json.dumps(found, indent=2) + "\n")
    (out / "ranks.md").write_text("\n".join(ranks_markdown(found)) + "\n")
    click.echo((out / "ranks.md").read_text())


if __name__ == "__main__":
    main()
