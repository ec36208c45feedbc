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
        sys.executable, "-m", "benchmarks.serve_load", "--model", str(folder), "--requests", "8",
        "--concurrency", "3", "--max-tokens", "6", "--image-size", "64", "--warmup", "1",
        "--no-openblas", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    results = report["results"]
    assert results["requests"] == results["completed"] == 8 and results["errors"] == 0
    assert results["requests_per_s"] > 0 and results["tokens_per_s"] > 0
    assert 0 < results["ttft_s"]["p50"] <= results["ttft_s"]["p95"] <= results["latency_s"]["p95"]
    assert results["server"]["requests"]["completed"] == 9  # and the warm-up
    assert results["server"]["peak_memory_gb"] > 0
    assert {"git", "machine", "versions", "settings"} <= report.keys()
    assert "| requests/s | tokens/s |" in (out / "results.md").read_text()
