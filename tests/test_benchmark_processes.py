"""Each harness worker runs under a time limit; how it ended (exit status, signal, time limit) is
recorded and the run goes on; the run's time budget cuts every limit and skips what it cannot fit.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from benchmarks import run as harness
from benchmarks.processes import run_process
from benchmarks.weights import Folders


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_signal_is_named(tmp_path):
    ending = run_process(
        python("import os, signal; os.kill(os.getpid(), signal.SIGFPE)"),
        tmp_path / "log",
        tmp_path,
        dict(os.environ),
        limit_s=30,
    )
    assert ending.exit_code < 0 and ending.signal == "SIGFPE" and not ending.ok
    assert ending.describe() == "killed by SIGFPE" and ending.record()["signal"] == "SIGFPE"


def test_an_exit_status_and_the_log(tmp_path):
    code = "import sys; print('partway'); sys.exit(3)"
    ending = run_process(python(code), tmp_path / "log", tmp_path, dict(os.environ), None)
    assert ending.exit_code == 3 and ending.signal is None and ending.describe() == "exit 3"
    assert (tmp_path / "log").read_text() == "partway\n"


def test_the_time_limit_kills_the_whole_process_group(tmp_path):
    child = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen(['sleep', '60']); "
        f"open({str(child)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    start = time.perf_counter()
    ending = run_process(python(code), tmp_path / "log", tmp_path, dict(os.environ), 2.0)
    assert ending.timed_out and not ending.ok and time.perf_counter() - start < 20
    assert ending.describe() == "timed out: killed at its 2 s limit"
    pid = int(child.read_text())
    for _ in range(50):  # the grandchild went with its group (give the kernel a moment)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the worker's child {pid} outlived the time limit")


def test_a_failed_worker_is_recorded_and_the_run_goes_on(tmp_path):
    spec = {"task": "weights", "scale": "enormous", "cache": str(tmp_path / "cache")}
    found = harness.run_worker(spec, tmp_path, "weights", None, lambda m: None, 60)
    assert found["error"] == "exit 1" and found["exit_code"] == 1 and not found["timed_out"]
    assert "unknown scale 'enormous'" in found["log_tail"]


def session(tmp_path, deadline: float | None, logged: list) -> harness.Session:
    return harness.Session(
        out=tmp_path,
        folders=Folders(source=None, synthetic=False),
        options={},
        preload=None,
        mlx_dtype="float32",
        log=logged.append,
        limits=lambda task: 300.0,
        deadline=deadline,
    )


def test_the_time_budget_cuts_limits_and_skips_what_is_left(tmp_path, monkeypatch):
    limits = []
    monkeypatch.setattr(
        harness,
        "run_worker",
        lambda spec, out, name, preload, log, limit, env: limits.append(limit),
    )
    logged = []
    soon = session(tmp_path, time.perf_counter() + 60, logged)
    soon.run({"task": "kernels"}, "kernels", None)
    assert 50 < limits[0] <= 60  # the task's 300 s, cut to the budget left
    spent = session(tmp_path, time.perf_counter() + 1, logged)
    found = spent.run({"task": "generate", "runtime": "torch", "variant": "float"}, "gen", None)
    assert found["not_run"] and "time budget was spent" in found["error"] and len(limits) == 1
    (skipped,) = spent.skipped
    assert skipped["runtime"] == "torch" and skipped["task"] == "gen"
    session(tmp_path, None, logged).run({"task": "vision"}, "vision", None)
    assert limits[1] == 300.0


def test_a_timed_out_worker_keeps_the_progress_it_reported(tmp_path, monkeypatch):
    from benchmarks.processes import Ending
    from benchmarks.worker import partial_path

    def killed_at_the_limit(command, log, cwd, env, limit_s):
        log.write_text("loading\n")
        result = Path(command[-1])
        partial_path(result).write_text('{"phases_s": {"pass_cost": 1.5}}')
        return Ending(-9, True, limit_s, limit_s)

    monkeypatch.setattr(harness, "run_process", killed_at_the_limit)
    found = harness.run_worker({"task": "lookup"}, tmp_path, "lookup", None, lambda m: None, 30)
    assert found["timed_out"] and found["error"] == "timed out: killed at its 30 s limit"
    assert found["partial"] == {"phases_s": {"pass_cost": 1.5}} and found["log_tail"] == "loading\n"


def test_precompile_joins_the_kernels_of_the_passes_that_finished(tmp_path, monkeypatch):
    """Each first pass compiles into a folder of its own; those of the passes that finished are
    joined into one that every later worker is given (a killed one's may hold a torn file)."""
    seen = []

    def first_pass(spec, out, name, preload, log, limit, env):
        seen.append((name, spec, env))
        own = Path(env["MLX_PTX_CACHE_DIR"])
        (own / "nested").mkdir(parents=True, exist_ok=True)
        (own / "nested" / f"{name}.ptx").write_text(name)
        if name == "precompile-generate-mlx-vlm-float":
            return {"error": "timed out: killed at its 150 s limit", "timed_out": True}
        return {"of": spec.get("of", spec)["task"]}

    monkeypatch.setattr(harness, "run_worker", first_pass)
    runs = session(tmp_path, None, [])
    jobs = {
        "lookup/4bit": ({"task": "lookup"}, "lookup-mimo-mlx-4bit", "mimo-mlx"),
        "generate/mlx-vlm/float": ({"task": "generate"}, "generate-mlx-vlm-float", "mlx-vlm"),
        "vision/mimo-mlx": ({"task": "vision"}, "vision-mimo-mlx", "mimo-mlx"),
    }
    found = runs.precompile(jobs, together=2)
    shared = tmp_path / "work" / "kernels" / "all"
    kept = sorted(p.name for p in (shared / "nested").iterdir())
    assert kept == ["precompile-lookup-mimo-mlx-4bit.ptx", "precompile-vision-mimo-mlx.ptx"]
    assert found["kernel_files"] == 2 and found["together"] == 2
    assert "error" in found["workers"]["generate/mlx-vlm/float"]
    assert {spec["task"] for _, spec, _ in seen} == {"precompile"}
    assert len({env["MLX_PTX_CACHE_DIR"] for _, _, env in seen}) == 3  # a folder each
    runs.run({"task": "generate"}, "generate-mimo-mlx-float", None)
    assert seen[-1][2] == {"MLX_PTX_CACHE_DIR": str(shared)}


def test_precompile_runs_as_many_at_once_as_the_device_holds():
    from benchmarks.settings import precompile_together
    from benchmarks.synthetic import scaled_config

    full, h200 = scaled_config("full"), 143771 * 2**20  # MiB, as nvidia-smi gives it
    assert precompile_together(full, 6, h200) == 4  # 25 GB each: bfloat16 and a 4-bit copy
    assert precompile_together(full, 6, 24 * 10**9) == 1
    assert precompile_together(scaled_config("tiny"), 6, 24 * 10**9) == 6
