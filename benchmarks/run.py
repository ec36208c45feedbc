"""The benchmark harness: `python -m benchmarks.run --scale small` (see benchmarks/README.md).

For the same weights, prompt and image it measures mimo-mlx, mlx-vlm and transformers (PyTorch),
each runtime and task in its own process: vision encode time per image size, time to first token,
prefill and decode tokens/s, peak memory; plus mimo-mlx's decode overhead above the bare kernels,
MLX op counts of one vision pass, and the backend's kernel bounds. Writes results.json,
results.md and results.png to the output folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import click

from .machine import REPO, git_state, machine_info, versions
from .ranks import measure as measure_ranks
from .report import write_report
from .settings import (
    CACHE,
    MLX_RUNTIMES,
    RUNTIMES,
    SCENARIOS,
    model_fits,
    openblas_preload,
    openblas_warning,
    settings,
    size_plans,
)
from .stats import pooled
from .weights import VARIANTS, Folders, prepare


def run_worker(spec: dict, out: Path, name: str, preload: str | None, log) -> dict:
    """Run one measurement in a fresh process; a failure is recorded with the end of its stderr."""
    spec_path, result_path = out / "work" / f"{name}.spec.json", out / "work" / f"{name}.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec, indent=2, default=str))
    env = dict(os.environ)
    if preload:
        env["LD_PRELOAD"] = preload
    log(f"  {name} ...")
    start = time.perf_counter()
    with open(out / "work" / f"{name}.log", "w") as stderr:
        code = subprocess.run(
            [sys.executable, "-m", "benchmarks.worker", str(spec_path), str(result_path)],
            cwd=REPO,
            env=env,
            stdout=stderr,
            stderr=subprocess.STDOUT,
        ).returncode
    elapsed = time.perf_counter() - start
    if code != 0 or not result_path.is_file():
        tail = (out / "work" / f"{name}.log").read_text()[-2000:]
        log(f"  {name} FAILED after {elapsed:.0f}s (exit {code})")
        return {"error": f"exit {code}", "log_tail": tail}
    log(f"  {name} done in {elapsed:.0f}s")
    return json.loads(result_path.read_text())


@click.command()
@click.option(
    "--scale",
    type=click.Choice(["tiny", "small", "full"]),
    default="small",
    show_default=True,
    help="Synthetic weights: tiny (seconds), small (minutes), full (MiMo-VL-7B shapes).",
)
@click.option(
    "--model",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A float HF MiMo-VL folder (safetensors): used instead of synthetic weights.",
)
@click.option(
    "--mlx-model",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A folder made by `mimo-mlx convert`: mimo-mlx runs it for its variant.",
)
@click.option(
    "--scenarios",
    default=",".join(SCENARIOS),
    show_default=True,
    help="Which measurements to run (the kernel bounds have --kernels/--no-kernels).",
)
@click.option("--runtimes", default=",".join(RUNTIMES), show_default=True)
@click.option("--variants", default=",".join(VARIANTS), show_default=True)
@click.option("--sizes", help="Vision image sizes, comma-separated (default 448,1024,1344).")
@click.option("--runs", type=int, help="Timed runs per measurement.")
@click.option(
    "--rounds",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Run every measurement this many times, runtimes taking turns, and pool the runs: a "
    "machine whose speed drifts over minutes then shows up in the spread, not as a difference "
    "between runtimes.",
)
@click.option("--warmup", type=int, help="Warm-up runs before each measurement.")
@click.option("--decode-tokens", type=int, help="Tokens decoded per generation (default 64).")
@click.option("--image-size", type=int, help="The prompt's image for generation (default 448).")
@click.option("--text-tokens", type=int, help="Text tokens around the image (default 32).")
@click.option(
    "--lookup-tokens",
    type=int,
    help="Tokens per answer in the prompt-lookup scenario (default: twice --decode-tokens, at "
    "least 32; 0 skips it).",
)
@click.option(
    "--openblas/--no-openblas",
    default=None,
    help="Preload the system OpenBLAS into MLX processes (default: on where it exists).",
)
@click.option("--kernels/--no-kernels", default=True, help="Measure the kernel bounds.")
@click.option(
    "--ranks",
    default="1,2",
    show_default=True,
    help="mimo-mlx split across this many ranks (mlx.launch, ring on 127.0.0.1), for per-rank "
    "peak memory and the vision tower split or on rank 0; empty to skip.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Output folder (default benchmarks/results/SCALE-TIME).",
)
@click.option("--cache", type=click.Path(path_type=Path), default=CACHE, show_default=True)
@click.option("--prepare-only", is_flag=True, help="Make the cached weight folders and stop.")
def main(
    scale,
    model,
    mlx_model,
    scenarios,
    runtimes,
    variants,
    sizes,
    runs,
    rounds,
    warmup,
    decode_tokens,
    image_size,
    text_tokens,
    lookup_tokens,
    openblas,
    kernels,
    ranks,
    out,
    cache,
    prepare_only,
) -> None:
    """Benchmark mimo-mlx against mlx-vlm and transformers on the same weights and inputs."""
    scenarios = [s for s in scenarios.split(",") if s]
    if unknown := sorted(set(scenarios) - set(SCENARIOS)):
        raise click.BadParameter(
            f"unknown {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}",
            param_hint="--scenarios",
        )
    runtimes = [r for r in runtimes.split(",") if r]
    variants = [v for v in variants.split(",") if v]
    log = lambda message: click.echo(message, err=True)  # noqa: E731
    started = datetime.now(timezone.utc)
    import mlx.core as mx

    cpu = mx.default_device() == mx.cpu
    if warning := openblas_warning(cpu, openblas):
        log(warning)
    folders = prepare(cache, scale, runtimes, variants, model, mlx_model, log)
    if prepare_only:
        return
    overrides = dict(
        runs=runs,
        warmup=warmup,
        decode=decode_tokens,
        image=image_size,
        text=text_tokens,
        lookup=lookup_tokens,
    )
    if sizes:
        overrides["sizes"] = [int(s) for s in sizes.split(",")]
    options = settings(scale, cpu, overrides)
    out = out or REPO / "benchmarks" / "results" / f"{scale}-{started:%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    session = Session(
        out=out,
        folders=folders,
        options=options,
        preload=openblas_preload(openblas, cpu),
        mlx_dtype="float32" if cpu else "bfloat16",
        rounds=rounds,
        config=json.loads(((folders.source or mlx_model) / "config.json").read_text()),
        log=log,
    )
    log(f"benchmarking at scale {scale}; results in {out}")
    wanted = set(scenarios)
    results = {"vision": session.vision(runtimes, variants) if "vision" in wanted else {}}
    results["generate"] = session.generate(runtimes, variants, cpu) if "generate" in wanted else {}
    if "mimo-mlx" in runtimes:
        if "multiturn" in wanted:
            results["multiturn"] = session.multiturn(variants)
        if "lookup" in wanted:
            results["prompt_lookup"] = session.prompt_lookup(variants)
        if "ranks" in wanted:
            results["ranks"] = session.ranks(variants, [int(n) for n in ranks.split(",") if n])
    bounds = session.kernel_bounds(quick=scale == "tiny") if kernels else {}
    report = {
        "scale": scale,
        "started_utc": started.isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.run", *sys.argv[1:]]),
        "git": git_state(),
        "machine": machine_info(),
        "versions": versions(),
        "settings": {**session.settings(runtimes, variants), "scenarios": scenarios},
        "results": results,
        "kernel_bounds": bounds,
        "skipped": session.skipped,
    }
    paths = write_report(report, out)
    log("wrote " + ", ".join(str(p) for p in paths))


@dataclass
class Session:
    """One harness run: where results go, the weights, the settings; runs the workers."""

    out: Path
    folders: Folders
    options: dict
    preload: str | None
    mlx_dtype: str
    config: dict
    log: Callable[[str], None]
    rounds: int = 1
    skipped: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        for (runtime, variant), reason in self.folders.skipped.items():
            self.skip(runtime, variant, "all", reason)

    def skip(self, runtime: str, variant: str, task: str, reason: str) -> None:
        self.skipped.append(
            {"runtime": runtime, "variant": variant, "task": task, "reason": reason}
        )

    def run(self, spec: dict, name: str, runtime: str | None) -> dict:
        preload = self.preload if runtime in MLX_RUNTIMES else None  # never into torch
        return run_worker(spec, self.out, name, preload, self.log)

    def in_rounds(self, jobs: dict[str, tuple[dict, str, str]]) -> dict:
        """Run each job (key -> (spec, worker name, runtime)) once per round, jobs taking turns
        within a round, and pool each job's rounds."""
        collected: dict[str, list] = {key: [] for key in jobs}
        for number in range(1, self.rounds + 1):
            for key, (spec, name, runtime) in jobs.items():
                label = f"{name}-round{number}" if self.rounds > 1 else name
                collected[key].append(self.run(spec, label, runtime))
        return {key: pooled(results) for key, results in collected.items()}

    def vision(self, runtimes: list[str], variants: list[str]) -> dict:
        """The float tower of each runtime (the 4-bit folders keep the same float tower)."""
        jobs = {}
        for runtime in runtimes:
            folder = self.folders.paths.get((runtime, "float"))
            if "float" not in variants or folder is None:
                continue
            spec = {
                "task": "vision",
                "runtime": runtime,
                "folder": str(folder),
                "dtype": self.mlx_dtype,
                "sizes": size_plans(self.options),
                "opcount": max(self.options["sizes"]) if runtime in MLX_RUNTIMES else None,
            }
            jobs[runtime] = (spec, f"vision-{runtime}", runtime)
        return self.in_rounds(jobs)

    def generate(self, runtimes: list[str], variants: list[str], cpu: bool) -> dict:
        """Whole generations per runtime and variant, float ones only where the model fits."""
        jobs = {}
        ram = machine_info()["ram_gb"] * 1e9
        for variant in variants:
            for runtime in runtimes:
                folder = self.folders.paths.get((runtime, variant))
                if folder is None:
                    continue
                if variant == "float":
                    per_param = 4 if (cpu if runtime != "torch" else _torch_cpu()) else 2
                    fits, need = model_fits(self.config, ram, per_param)
                    if not fits:
                        reason = (
                            f"the float model needs {need:.0f} GB, more than 80% of this "
                            f"machine's {ram / 1e9:.0f} GB"
                        )
                        self.skip(runtime, variant, "generate", reason)
                        continue
                spec = {
                    "task": "generate",
                    "runtime": runtime,
                    "folder": str(folder),
                    "dtype": self.mlx_dtype,
                    "image_size": self.options["image"],
                    "text_tokens": self.options["text"],
                    "decode_tokens": self.options["decode"],
                    "warmup": self.options["gen_warmup"],
                    "runs": self.options["gen_runs"],
                    "overhead": runtime == "mimo-mlx",
                }
                jobs[f"{runtime}/{variant}"] = (spec, f"generate-{runtime}-{variant}", runtime)
        results = self.in_rounds(jobs)
        for entry in results.values():  # ratios from the pooled medians, not one round's
            if "overhead" in entry:
                over = entry["overhead"]
                over["step_s"] = entry["decode_step_s"]["median"]
                over["overhead"] = over["step_s"] / over["kernels_step_s"]["median"] - 1.0
        return results

    def multiturn(self, variants: list[str]) -> dict:
        """mimo-mlx's second turn about the same image, with and without reuse, per variant."""
        jobs = {}
        for variant in variants:
            folder = self.folders.paths.get(("mimo-mlx", variant))
            if folder is None:
                continue
            spec = {
                "task": "multiturn",
                "runtime": "mimo-mlx",
                "folder": str(folder),
                "dtype": self.mlx_dtype,
                "image_size": self.options["image"],
                "answer_tokens": self.options["decode"],
                "warmup": self.options["gen_warmup"],
                "runs": self.options["gen_runs"],
            }
            jobs[variant] = (spec, f"multiturn-mimo-mlx-{variant}", "mimo-mlx")
        results = self.in_rounds(jobs)
        for entry in results.values():
            if "error" not in entry:
                medians = [entry[k]["ttft_s"]["median"] for k in ("without_reuse", "with_reuse")]
                entry["speedup"] = medians[0] / medians[1]
        return results

    def prompt_lookup(self, variants: list[str]) -> dict:
        """mimo-mlx with and without prompt lookup on a copy-heavy task and plain ones
        (benchmarks/lookup.py), per variant."""
        jobs = {}
        for variant in variants:
            folder = self.folders.paths.get(("mimo-mlx", variant))
            if folder is None:
                continue
            if not self.options["lookup"]:
                reason = "--lookup-tokens 0 (the default at full scale on a CPU: minutes a pass)"
                self.skip("mimo-mlx", variant, "prompt lookup", reason)
                continue
            spec = {
                "task": "lookup",
                "runtime": "mimo-mlx",
                "folder": str(folder),
                "dtype": self.mlx_dtype,
                "image_size": self.options["image"],
                "answer_tokens": self.options["lookup"],
                "warmup": self.options["gen_warmup"],
                "runs": self.options["gen_runs"],
            }
            jobs[variant] = (spec, f"lookup-mimo-mlx-{variant}", "mimo-mlx")
        results = self.in_rounds(jobs)
        for entry in results.values():  # speedups from the pooled medians, not one round's
            for task in entry.get("tasks", {}).values():
                medians = [task[k]["decode_tps"]["median"] for k in ("with", "without")]
                task["speedup"] = medians[0] / medians[1]
        return results

    def ranks(self, variants: list[str], counts: list[int]) -> dict:
        """mimo-mlx's folders split across each number of ranks (`ranks.py`)."""
        folders = {
            v: self.folders.paths[("mimo-mlx", v)]
            for v in variants
            if ("mimo-mlx", v) in self.folders.paths
        }
        if not counts or not folders:
            return {}
        return measure_ranks(
            folders, counts, self.options, self.out, self.preload, self.mlx_dtype, self.log
        )

    def kernel_bounds(self, quick: bool) -> dict:
        """MLX's kernels as shipped, and (Linux CPU) with the system OpenBLAS preloaded."""
        spec = {"task": "kernels", "options": {"quick": quick}}
        bounds = {"mlx": run_worker(spec, self.out, "kernels", None, self.log)}
        if self.preload:
            bounds["mlx_openblas"] = run_worker(
                spec, self.out, "kernels-openblas", self.preload, self.log
            )
        return bounds

    def settings(self, runtimes: list[str], variants: list[str]) -> dict:
        return {
            **self.options,
            "runtimes": runtimes,
            "variants": variants,
            "mlx_float_dtype": self.mlx_dtype,
            "openblas_preload": self.preload,
            "rounds": self.rounds,
            "weights": {
                "source": str(self.folders.source),
                "synthetic": self.folders.synthetic,
                "folders": {f"{r}/{v}": str(p) for (r, v), p in self.folders.paths.items()},
            },
            "config": self.config,
        }


def _torch_cpu() -> bool:
    import torch

    return not (torch.backends.mps.is_available() or torch.cuda.is_available())


if __name__ == "__main__":
    main()
