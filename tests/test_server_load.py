"""The serve load run (`benchmarks/serve_load.py`) end to end on the tiny test model, so it cannot
rot; the checks are on the files it writes, not on timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_generate import write_model_folder

REPO = Path(__file__).resolve().parent.parent


def test_a_small_load_run_writes_its_report(tmp_path):
    folder = write_model_folder(tmp_path / "model", seed=21)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "benchmarks.serve_load", "--model", str(folder), "--requests", "4",
        "--clients", "1,3", "--max-batch", "1,3", "--max-tokens", "6", "--image-size", "64",
        "--warmup", "1", "--probe-frames", "4", "--probe-size", "56", "--probe-tokens", "16",
        "--no-openblas", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    results = report["results"]
    runs = results["runs"]
    assert [(r["clients"], r["max_batch"]) for r in runs] == [(1, 1), (1, 3), (3, 1), (3, 3)]
    for run in runs:  # interleaved: each client count on both servers
        assert run["requests"] == run["completed"] == 4 and run["errors"] == 0
        assert run["requests_per_s"] > 0 and run["tokens_per_s"] > 0
        assert 0 < run["ttft_s"]["p50"] <= run["ttft_s"]["p95"] <= run["latency_s"]["p95"]
        assert run["inter_token_s"]["p50"] > 0 and run["mlx_peak_gb"] > 0
        for request in run["per_request"]:  # one event per token (an end token has none)
            ended = request["finish_reason"] == "stop"
            assert len(request["arrivals_s"]) == request["completion_tokens"] - ended
    assert [(r["max_batch"], r["clients"]) for r in results["ratios"]] == [(3, 1), (3, 3)]
    for probe in results["probe"].values():
        assert probe["video_prompt_tokens"] > 0 and probe["running_tokens"] > 8
        assert probe["video_ttft_s"] > 0 and probe["gap_before_p50_s"] > 0
    assert results["counts"]["3"]["completed"] == 1 + 8 + 2  # warm-up, the runs, the probe
    assert {"git", "machine", "versions", "settings", "load_average"} <= report.keys()
    assert "| --max-batch | clients | requests/s | tokens/s |" in (out / "results.md").read_text()
