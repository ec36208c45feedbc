"""The benchmark harness: `python -m benchmarks.run --scale small` (see benchmarks/README.md).

For the same weights, prompt and image it measures mimo-mlx, mlx-vlm and transformers (PyTorch),
each runtime and task in its own process with its own time limit: vision encode time per image
size, time to first token, prefill and decode tokens/s, peak memory; plus mimo-mlx's decode
overhead above the bare kernels, decode against the device's copy bandwidth, MLX op counts of
one vision pass, and the backend's kernel bounds. A worker that crashes or outlives its limit is
recorded with its exit status or signal, and the run goes on; each phase's time is printed as it
goes. Writes results.json, results.md and results.png to the output folder.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import click

from .machine import REPO, git_state, gpu_memory_bytes, machine_info, ram_bytes, versions
from .processes import run_process
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
    precompile_together,
    profile,
    settings,
    size_plans,
    time_limit,
)
from .stats import pooled
from .weights import VARIANTS, Folders, complete, on_disk, plan
from .worker import partial_path

MIN_START_S = 5.0  # a worker is not started with less of the time budget left than this


def run_worker(
    spec: dict,
    out: Path,
    name: str,
    preload: str | None,
    log,
    limit_s: float | None = None,
    env: dict[str, str] | None = None,
) -> dict:
    """Run one measurement in a fresh process (`env` added to this one's environment), killed
    after `limit_s` seconds. A failure is recorded with how it ended, the end of its log and the
    progress it reported."""
    work = out / "work"
    spec_path, result_path = work / f"{name}.spec.json", work / f"{name}.json"
    work.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec, indent=2, default=str))
    for stale in (result_path, partial_path(result_path)):
        stale.unlink(missing_ok=True)
    env = {**os.environ, **(env or {})}
    if preload:
        env["LD_PRELOAD"] = preload
    limit = f" (limit {limit_s:.0f} s)" if limit_s else ""
    log(f"{name} ...{limit}")
    command = [sys.executable, "-m", "benchmarks.worker", str(spec_path), str(result_path)]
    ending = run_process(command, work / f"{name}.log", REPO, env, limit_s)
    if not ending.ok or not result_path.is_file():
        failure = ending.record()
        if ending.ok:
            failure["error"] = "exited 0 without writing a result"
        failure["log_tail"] = (work / f"{name}.log").read_text(errors="replace")[-2000:]
        if partial_path(result_path).is_file():
            failure["partial"] = json.loads(partial_path(result_path).read_text())
        log(f"{name} FAILED after {ending.seconds:.1f} s: {failure['error']}")
        return failure
    log(f"{name} done in {ending.seconds:.1f} s")
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
    "--precompile/--no-precompile",
    default=None,
    help="Before measuring, run each MLX worker's first pass, several at once, so that MLX's "
    "CUDA build compiles its kernels in parallel rather than inside each measurement (default: "
    "on with MLX's CUDA build, where compiling took minutes of a full-scale run; off elsewhere).",
)
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
@click.option(
    "--time-budget",
    type=click.FloatRange(min=1),
    help="Seconds the whole run may take, the weights included: each worker's time limit is cut "
    "to what is left, and workers that would start with less than 5 s left are recorded as not "
    "run. The results are written either way (for a lent machine's command limit).",
)
@click.option("--prepare-only", is_flag=True, help="Make the cached weights and stop.")
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
    precompile,
    ranks,
    out,
    cache,
    time_budget,
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
    started, clock = datetime.now(timezone.utc), time.perf_counter()
    log = lambda message: click.echo(  # noqa: E731
        f"[{time.perf_counter() - clock:7.1f} s] {message}", err=True
    )
    import mlx.core as mx  # the driver only asks which device there is; workers compute

    cpu = mx.default_device() == mx.cpu
    if warning := openblas_warning(cpu, openblas):
        log(warning)
    out = out or REPO / "benchmarks" / "results" / f"{scale}-{started:%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    folders = plan(cache, scale, runtimes, variants, model, mlx_model)
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
    session = Session(
        out=out,
        folders=folders,
        options=settings(scale, cpu, overrides),
        preload=openblas_preload(openblas, cpu),
        mlx_dtype="float32" if cpu else "bfloat16",
        rounds=rounds,
        log=log,
        limits=lambda task: time_limit(scale, cpu, task),
        deadline=None if time_budget is None else clock + time_budget,
    )
    log(f"benchmarking at scale {scale} ({profile(scale, cpu)}); results in {out}")
    weights = session.weights(scale, cache)
    if "error" in weights:
        log(f"no weights to measure: {weights['error']} (see {out / 'work'})")
        raise SystemExit(1)
    if prepare_only:
        session.phase(None)
        return
    session.config = json.loads(((folders.source or mlx_model) / "config.json").read_text())
    wanted = set(scenarios)
    if precompile is None:
        precompile = not cpu and not mx.metal.is_available()  # MLX's CUDA build
    compiled = {}
    if precompile and (jobs := session.precompile_jobs(runtimes, variants, cpu, wanted)):
        memory = (ram_bytes() if cpu else gpu_memory_bytes()) or 0
        compiled = session.precompile(jobs, precompile_together(session.config, len(jobs), memory))
    # Most wanted first: a run cut short by its time budget loses the last (and says so). Vision
    # before prompt lookup: on an H200 it took 38 s against lookup's 136, and a budget that cut
    # both lost the memory figures of issue 22.
    bounds = session.kernel_bounds(quick=scale == "tiny") if kernels else {}
    results = {
        "generate": session.generate(runtimes, variants, cpu) if "generate" in wanted else {}
    }
    results["vision"] = session.vision(runtimes, variants) if "vision" in wanted else {}
    if "mimo-mlx" in runtimes and "lookup" in wanted:
        results["prompt_lookup"] = session.prompt_lookup(variants)
    if "mimo-mlx" in runtimes:
        if "multiturn" in wanted:
            results["multiturn"] = session.multiturn(variants)
        if "ranks" in wanted:
            counts = [int(n) for n in ranks.split(",") if n]
            results["ranks"] = session.ranks(variants, counts, cache, cpu)
    session.phase("report")
    report = {
        "scale": scale,
        "profile": profile(scale, cpu),
        "started_utc": started.isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.run", *sys.argv[1:]]),
        "git": git_state(),
        "machine": machine_info(),
        "versions": versions(),
        "settings": {**session.settings(runtimes, variants), "scenarios": scenarios},
        "weights": weights,
        "results": results,
        "kernel_bounds": bounds,
        "precompile": compiled,
        "skipped": session.skipped,
        "phases_s": session.phases,
        "time_budget_s": time_budget,
    }
    paths = write_report(report, out)
    session.phase(None)
    log(f"wrote {', '.join(str(p) for p in paths)} in {time.perf_counter() - clock:.1f} s in all")


@dataclass
class Session:
    """One harness run: where results go, the weights, the settings, each worker's time limit
    and the run's deadline; runs the workers and times the phases."""

    out: Path
    folders: Folders
    options: dict
    preload: str | None
    mlx_dtype: str
    log: Callable[[str], None]
    limits: Callable[[str], float]  # task -> seconds a worker may run
    deadline: float | None = None  # time.perf_counter() by which the run must be done
    config: dict = field(default_factory=dict)
    rounds: int = 1
    skipped: list[dict] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    # The environment every worker after the precompile phase gets (its compiled kernels).
    worker_env: dict[str, str] = field(default_factory=dict)
    _phase: tuple[str, float] | None = None

    def __post_init__(self) -> None:
        for (runtime, variant), reason in self.folders.skipped.items():
            self.skip(runtime, variant, "all", reason)

    def phase(self, name: str | None) -> None:
        """End the current phase (its time printed and kept) and begin `name` (None: none)."""
        now = time.perf_counter()
        if self._phase is not None:
            done, began = self._phase
            self.phases[done] = self.phases.get(done, 0.0) + now - began
            self.log(f"== {done}: {now - began:.1f} s")
        self._phase = None if name is None else (name, now)
        if name is not None:
            self.log(f"== {name}")

    def weights(self, scale: str, cache: Path) -> dict:
        """The synthetic checkpoint, drawn in a worker on the device (the driver keeps no device
        memory) unless the cache has it; {} when the run reads the user's folders."""
        source = self.folders.source
        if not self.folders.synthetic or source is None:
            return {}
        self.phase("weights")
        if complete(source):
            self.log(f"weights: {source} (cached)")
            return {"folder": str(source), "made": False}
        spec = {"task": "weights", "scale": scale, "cache": str(cache)}
        made = self.run(spec, "weights", None)
        if "error" not in made:
            self.log(
                f"weights: {made['parameters'] / 1e6:,.0f} M parameters, "
                f"{made['bytes'] / 1e6:,.0f} MB on {made['device']} in {made['seconds']:.1f} s"
            )
        return made

    def skip(self, runtime: str, variant: str, task: str, reason: str) -> None:
        self.skipped.append(
            {"runtime": runtime, "variant": variant, "task": task, "reason": reason}
        )

    def left(self) -> float:
        """Seconds left of the time budget (infinite without one)."""
        return float("inf") if self.deadline is None else self.deadline - time.perf_counter()

    def spent(self) -> str:
        return f"not run: the time budget was spent ({max(0.0, self.left()):.0f} s left)"

    def preload_for(self, runtime: str | None) -> str | None:
        return self.preload if runtime in MLX_RUNTIMES else None  # never into torch

    def run(
        self, spec: dict, name: str, preload: str | None, env: dict[str, str] | None = None
    ) -> dict:
        """One worker, under its task's time limit cut to the run's deadline."""
        limit = self.limits(spec["task"])
        if self.deadline is not None:
            left = self.left()
            if left < MIN_START_S:
                reason = self.spent()
                self.log(f"{name}: {reason}")
                self.skip(spec.get("runtime", "-"), spec.get("variant", "-"), name, reason)
                return {"error": reason, "not_run": True}
            limit = min(limit, left)
        env = {**self.worker_env, **(env or {})}
        return run_worker(spec, self.out, name, preload, self.log, limit, env)

    def in_rounds(self, jobs: dict[str, tuple[dict, str, str]]) -> dict:
        """Run each job (key -> (spec, worker name, runtime)) once per round, jobs taking turns
        within a round, and pool each job's rounds."""
        collected: dict[str, list] = {key: [] for key in jobs}
        for number in range(1, self.rounds + 1):
            for key, (spec, name, runtime) in jobs.items():
                label = f"{name}-round{number}" if self.rounds > 1 else name
                collected[key].append(self.run(spec, label, self.preload_for(runtime)))
        return {key: pooled(results) for key, results in collected.items()}

    def vision(self, runtimes: list[str], variants: list[str]) -> dict:
        """The float tower of each runtime (the 4-bit folders keep the same float tower)."""
        self.phase("vision")
        return self.in_rounds(self.vision_jobs(runtimes, variants))

    def vision_jobs(self, runtimes: list[str], variants: list[str]) -> dict:
        jobs = {}
        for runtime in runtimes:
            weights = self.folders.paths.get((runtime, "float"))
            if "float" not in variants or weights is None:
                continue
            spec = {
                "task": "vision",
                "runtime": runtime,
                "folder": str(weights.folder),
                "dtype": self.mlx_dtype,
                "sizes": size_plans(self.options),
                "opcount": max(self.options["sizes"]) if runtime in MLX_RUNTIMES else None,
            }
            jobs[runtime] = (spec, f"vision-{runtime}", runtime)
        return jobs

    def generate(self, runtimes: list[str], variants: list[str], cpu: bool) -> dict:
        """Whole generations per runtime and variant, float ones only where the model fits."""
        self.phase("generate")
        results = self.in_rounds(self.generate_jobs(runtimes, variants, cpu))
        for entry in results.values():  # ratios from the pooled medians, not one round's
            if "overhead" in entry and "error" not in entry:
                over = entry["overhead"]
                over["step_s"] = entry["decode_step_s"]["median"]
                over["overhead"] = over["step_s"] / over["kernels_step_s"]["median"] - 1.0
        return results

    def generate_jobs(
        self, runtimes: list[str], variants: list[str], cpu: bool, record: bool = True
    ) -> dict:
        """The generate workers' jobs; a float one that does not fit is recorded as skipped
        (once: the precompile phase asks with `record=False`)."""
        jobs = {}
        ram = ram_bytes()
        for variant in variants:
            for runtime in runtimes:
                weights = self.folders.paths.get((runtime, variant))
                if weights is None:
                    continue
                if variant == "float":
                    per_param = 4 if (cpu if runtime != "torch" else _torch_cpu()) else 2
                    fits, need = model_fits(self.config, ram, per_param)
                    if not fits:
                        reason = (
                            f"the float model needs {need:.0f} GB, more than 80% of this "
                            f"machine's {ram / 1e9:.0f} GB"
                        )
                        if record:
                            self.skip(runtime, variant, "generate", reason)
                        continue
                spec = {
                    "task": "generate",
                    "runtime": runtime,
                    "variant": variant,
                    **weights.spec(),
                    "dtype": self.mlx_dtype,
                    "image_size": self.options["image"],
                    "text_tokens": self.options["text"],
                    "decode_tokens": self.options["decode"],
                    "warmup": self.options["gen_warmup"],
                    "runs": self.options["gen_runs"],
                    "overhead": runtime == "mimo-mlx",
                }
                jobs[f"{runtime}/{variant}"] = (spec, f"generate-{runtime}-{variant}", runtime)
        return jobs

    def multiturn(self, variants: list[str]) -> dict:
        """mimo-mlx's second turn about the same image, with and without reuse, per variant."""
        self.phase("multiturn")
        jobs = {}
        for variant in variants:
            weights = self.folders.paths.get(("mimo-mlx", variant))
            if weights is None:
                continue
            spec = {
                "task": "multiturn",
                "runtime": "mimo-mlx",
                "variant": variant,
                **weights.spec(),
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
        self.phase("prompt lookup")
        results = self.in_rounds(self.lookup_jobs(variants))
        for entry in results.values():  # speedups from the pooled medians, not one round's
            for task in entry.get("tasks", {}).values() if "error" not in entry else ():
                medians = [task[k]["decode_tps"]["median"] for k in ("with", "without")]
                task["speedup"] = medians[0] / medians[1]
        return results

    def lookup_jobs(self, variants: list[str], record: bool = True) -> dict:
        jobs = {}
        for variant in variants:
            weights = self.folders.paths.get(("mimo-mlx", variant))
            if weights is None:
                continue
            if not self.options["lookup"]:
                reason = "--lookup-tokens 0 (the default at full scale on a CPU: minutes a pass)"
                if record:
                    self.skip("mimo-mlx", variant, "prompt lookup", reason)
                continue
            spec = {
                "task": "lookup",
                "runtime": "mimo-mlx",
                "variant": variant,
                **weights.spec(),
                "dtype": self.mlx_dtype,
                "image_size": self.options["image"],
                "answer_tokens": self.options["lookup"],
                "warmup": self.options["gen_warmup"],
                "runs": self.options["gen_runs"],
            }
            jobs[variant] = (spec, f"lookup-mimo-mlx-{variant}", "mimo-mlx")
        return jobs

    def ranks(self, variants: list[str], counts: list[int], cache: Path, cpu: bool) -> dict:
        """mimo-mlx's folders split across each number of ranks (`ranks.py`); on a CPU only
        (one GPU would hold every rank)."""
        paths = self.folders.paths
        pairs = {v: paths[("mimo-mlx", v)] for v in variants if ("mimo-mlx", v) in paths}
        if not counts or not pairs:
            return {}
        if not cpu:
            for variant in pairs:
                reason = "one device: ranks on one GPU would share it (run on several machines)"
                self.skip("mimo-mlx", variant, "ranks", reason)
            return {}
        if self.left() < MIN_START_S:  # its launcher keeps its own limits: not started late
            for variant in pairs:
                self.skip("mimo-mlx", variant, "ranks", self.spent())
            return {}
        self.phase("ranks")
        folders = {v: on_disk(w, cache, self.log) for v, w in pairs.items()}
        return measure_ranks(
            folders, counts, self.options, self.out, self.preload, self.mlx_dtype, self.log
        )

    def precompile(self, jobs: dict[str, tuple[dict, str, str]], together: int) -> dict:
        """Each job's first pass, nothing timed, `together` workers at a time (task "precompile").

        On CUDA MLX compiles a kernel the first time a process uses it (NVRTC; one 4-bit matmul
        took 45 s on the H200) and keeps it on disk (MLX_PTX_CACHE_DIR), so the measurements
        after this find their kernels compiled: the compiling runs here in parallel, not inside
        each measurement in turn. Each worker compiles into a folder of its own (two processes
        writing one file could leave it torn); the folders of those that finished are joined
        into the one every later worker reads."""
        self.phase("precompile")
        folders = self.out / "work" / "kernels"
        shared = folders / "all"
        shared.mkdir(parents=True, exist_ok=True)

        def first_pass(job: tuple[dict, str, str]) -> tuple[Path, dict]:
            spec, name, runtime = job
            own = folders / name
            env = {"MLX_PTX_CACHE_DIR": str(own)}
            first = {"task": "precompile", "of": spec}
            return own, self.run(first, f"precompile-{name}", self.preload_for(runtime), env)

        with ThreadPoolExecutor(max_workers=together) as pool:
            done = dict(zip(jobs, pool.map(first_pass, jobs.values()), strict=True))
        workers = {}
        for key, (own, result) in done.items():
            if "error" not in result and own.is_dir():
                shutil.copytree(own, shared, dirs_exist_ok=True)
            workers[key] = result
        self.worker_env["MLX_PTX_CACHE_DIR"] = str(shared)
        files = sum(1 for f in shared.rglob("*") if f.is_file())
        self.log(f"precompile: {files} compiled kernel files for the measurements")
        return {"together": together, "kernel_files": files, "workers": workers}

    def precompile_jobs(
        self, runtimes: list[str], variants: list[str], cpu: bool, wanted: set[str]
    ) -> dict[str, tuple[dict, str, str]]:
        """What the precompile phase runs: each MLX worker the run will start that could need
        kernels no other one compiles, longest first. Prompt lookup's passes over 1 to 16 tokens
        cover its variant's generation (and multi-turn), which then has no first pass here."""
        jobs = {}
        if "mimo-mlx" in runtimes and "lookup" in wanted:
            jobs |= {f"lookup/{k}": job for k, job in self.lookup_jobs(variants, False).items()}
        if wanted & {"generate", "multiturn"}:
            for key, job in self.generate_jobs(runtimes, variants, cpu, False).items():
                runtime, variant = key.split("/")
                covered = runtime == "mimo-mlx" and f"lookup/{variant}" in jobs
                needed = "generate" in wanted or runtime == "mimo-mlx"
                if runtime in MLX_RUNTIMES and needed and not covered:
                    jobs[f"generate/{key}"] = job
        if "vision" in wanted:
            for runtime, job in self.vision_jobs(runtimes, variants).items():
                if runtime in MLX_RUNTIMES:
                    jobs[f"vision/{runtime}"] = job
        return jobs

    def kernel_bounds(self, quick: bool) -> dict:
        """MLX's kernels as shipped, and (Linux CPU) with the system OpenBLAS preloaded."""
        self.phase("kernel bounds")
        spec = {"task": "kernels", "options": {"quick": quick}}
        bounds = {"mlx": self.run(spec, "kernels", None)}
        if self.preload:
            bounds["mlx_openblas"] = self.run(spec, "kernels-openblas", self.preload)
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
                "folders": {f"{r}/{v}": w.spec() for (r, v), w in self.folders.paths.items()},
            },
            "config": self.config,
        }


def _torch_cpu() -> bool:
    try:
        import torch
    except ImportError:  # its worker fails and says so
        return True
    return not (torch.backends.mps.is_available() or torch.cuda.is_available())


if __name__ == "__main__":
    main()
