"""The batching benchmark (`benchmarks/batch.py`) end to end at `tiny` scale, so it cannot rot;
the checks are on the files it writes, not on timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_batch_benchmark_writes_its_report(tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "benchmarks.batch", "--scale", "tiny", "--sizes", "1,3",
        "--prompts", "1,3", "--rounds", "1", "--steps", "2", "--max-tokens", "6",
        "--image-size", "56", "--no-openblas", "--cache", str(tmp_path / "cache"),
        "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    results = report["results"]
    for variant in ("float", "4bit"):
        costs = results["step_costs"][variant]
        assert set(costs) == {"1", "3"} and costs["1"]["relative"] == 1.0
        assert costs["3"]["median"] > 0 and len(costs["3"]["values"]) == 2
    ways = [(run["prompts"], run["way"]) for run in results["api"]]
    assert ways == [(1, "loop"), (1, "batch"), (3, "loop"), (3, "batch")]
    for run in results["api"]:
        assert run["tokens"] > 0 and 0 < run["ttft_p50_s"] <= run["ttft_p95_s"] < run["wall_s"]
        assert run["requests_per_s"] == run["prompts"] / run["wall_s"]
        assert 0 < run["inter_token_p95_s"] < run["wall_s"]
    assert results["answers_agree"] is True
    assert {"git", "machine", "versions", "settings", "load_average"} <= report.keys()
    assert "| prompts | way | wall s |" in (out / "results.md").read_text()
