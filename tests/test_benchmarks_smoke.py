"""The benchmark harness runs end to end at `tiny` scale (one run each), so it cannot rot.

All three runtimes (mimo-mlx, mlx-vlm, transformers), both variants, the decode-overhead loop, the op
count and the kernel bounds run for real; the checks are on the files written, not on timings.
It is the path a full-scale GPU run takes: the weights drawn in a worker, the 4-bit variants made
in memory, every worker under a time limit within a time budget.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlx_vlm")
pytest.importorskip("torch")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    out = root / "out"
    command = [
        sys.executable, "-m", "benchmarks.run", "--scale", "tiny", "--sizes", "448",
        "--runs", "1", "--warmup", "0", "--decode-tokens", "4", "--text-tokens", "8",
        "--no-openblas", "--cache", str(root / "cache"), "--out", str(out), "--time-budget", "900",
        "--precompile",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    phases = ("weights", "precompile", "kernel bounds", "vision", "generate", "prompt lookup")
    for phase in (*phases, "report"):
        assert f"] == {phase}: " in done.stderr  # each phase's time, printed as it ends
    return out


def test_json_holds_every_measurement(results):
    report = json.loads((results / "results.json").read_text())
    assert {"git", "machine", "versions", "settings", "kernel_bounds", "targets"} <= report.keys()
    assert report["machine"]["cores"] >= 1 and report["versions"]["mlx"]
    vision = report["results"]["vision"]
    for runtime in ("mimo-mlx", "mlx-vlm", "torch"):
        assert "error" not in vision[runtime], vision[runtime]
        (row,) = vision[runtime]["sizes"]
        assert row["grid_thw"] == [1, 32, 32] and row["seconds"]["median"] > 0
        assert row["peak_memory_bytes"] > 0 and row["memory_method"]
    assert vision["mimo-mlx"]["ops"]["ops"] > 0 and vision["mlx-vlm"]["ops"]["ops"] > 0
    for runtime in ("mimo-mlx", "mlx-vlm"):  # every MLX vision pass waits on the host at least once
        assert vision[runtime]["sizes"][0]["host_syncs"]["host_syncs"] >= 1
    generate = report["results"]["generate"]
    expected = {"mimo-mlx/float", "mlx-vlm/float", "torch/float", "mimo-mlx/4bit", "mlx-vlm/4bit"}
    assert set(generate) == expected
    for key, entry in generate.items():
        assert "error" not in entry, (key, entry)
        assert len(entry["tokens"]) == 4 and entry["decode_tps"]["median"] > 0
        assert entry["ttft_s"]["median"] > 0 and entry["prefill_tps"]["median"] > 0
    assert generate["mimo-mlx/4bit"]["overhead"]["kernels_step_s"]["median"] > 0
    for key in ("mimo-mlx/float", "mlx-vlm/float"):  # reading each token back is one sync
        assert generate[key]["host_syncs"]["per_decode_step"] >= 1
    assert report["kernel_bounds"]["mlx"]["matmul_gflops_f32"]
    assert any(s["runtime"] == "torch" and s["variant"] == "4bit" for s in report["skipped"])
    assert report["weights"]["made"] and report["weights"]["parameters"] > 0
    assert {"weights", "kernel bounds", "vision", "generate"} <= report["phases_s"].keys()
    # The first passes before the measurements: each MLX worker whose kernels no other compiles
    # (lookup's passes cover its variant's generation), all done, nothing timed.
    compiled = report["precompile"]
    expected_passes = {"lookup/float", "lookup/4bit", "generate/mlx-vlm/float"}
    expected_passes |= {"generate/mlx-vlm/4bit", "vision/mimo-mlx", "vision/mlx-vlm"}
    assert set(compiled["workers"]) == expected_passes and compiled["together"] >= 1
    for key, entry in compiled["workers"].items():
        assert "error" not in entry and entry["of"] == key.split("/")[0], (key, entry)
    for key in ("mimo-mlx/4bit", "mlx-vlm/4bit"):  # quantized in memory, by each one's recipe
        assert generate[key]["recipe"] and generate[key]["quantized_fingerprint"]
    fingerprints = {generate[k]["quantized_fingerprint"] for k in ("mimo-mlx/4bit", "mlx-vlm/4bit")}
    assert len(fingerprints) == 1  # the same 4-bit weights in both runtimes
    assert generate["mimo-mlx/float"]["quantized_fingerprint"] is None
    copy = report["kernel_bounds"]["mlx"]["copy"]["bytes_per_s"]
    assert copy > 0
    bandwidth = report["decode_bandwidth"]
    assert set(bandwidth) == expected
    for key, row in bandwidth.items():
        step = generate[key]["decode_step_s"]["median"]
        assert row["fraction_of_copy"] == row["bytes_per_token"]["total"] / step / copy
    assert bandwidth["mimo-mlx/4bit"]["bytes_per_token"]["weights"] < (
        bandwidth["mimo-mlx/float"]["bytes_per_token"]["weights"] / 2
    )
    assert bandwidth["mimo-mlx/float"]["kernels_step_s"] > 0


def test_markdown_and_chart_are_written(results):
    text = (results / "results.md").read_text()
    headings = ("## Vision tower", "## Generation", "## Decode overhead", "## Host syncs")
    headings += ("## Decode against the bandwidth limit", "## A forward pass over k tokens")
    headings += ("## Where prompt lookup's decode time went",)
    for heading in (*headings, "## Targets"):
        assert heading in text
    assert "identical in mimo-mlx and mlx-vlm" in text and "Phases: weights " in text
    pytest.importorskip("matplotlib")
    assert (results / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_warns_without_the_system_openblas(monkeypatch, tmp_path):
    from benchmarks import settings

    monkeypatch.setattr(settings, "OPENBLAS", str(tmp_path / "missing.so"))
    monkeypatch.setattr(settings.sys, "platform", "linux")
    warning = settings.openblas_warning(cpu=True, openblas=None)
    assert "apt-get install libopenblas0-pthread" in warning and "40x" in warning
    assert settings.openblas_warning(cpu=False, openblas=None) is None
    assert settings.openblas_warning(cpu=True, openblas=False) is None  # asked to go without it


def test_rounds_pool_every_run():
    from benchmarks.stats import pooled, summarize

    first = {"ttft_s": summarize([1.0, 2.0]), "sizes": [{"seconds": summarize([5.0])}], "n": 3}
    second = {"ttft_s": summarize([4.0]), "sizes": [{"seconds": summarize([7.0])}], "n": 3}
    merged = pooled([first, second])
    assert merged["ttft_s"]["values"] == [1.0, 2.0, 4.0] and merged["ttft_s"]["median"] == 2.0
    assert merged["sizes"][0]["seconds"]["values"] == [5.0, 7.0] and merged["n"] == 3
    assert pooled([first, {"error": "exit 1"}]) == {"error": "exit 1"}


def test_multiturn_second_turn_computes_only_the_new_turn(results):
    """With reuse, turn 2 computes only what turn 1 never fed the model: the answer's last token
    (sampled, not yet computed) and the new turn."""
    from benchmarks.multiturn import QUESTIONS, chat_processor

    report = json.loads((results / "results.json").read_text())
    config = report["settings"]["config"]
    new_turn = f"<|im_end|>\n<|im_start|>user\n{QUESTIONS[1]}<|im_end|>\n<|im_start|>assistant\n"
    expected = 1 + len(chat_processor(config).tokenizer.encode(new_turn))
    for variant in ("float", "4bit"):
        entry = report["results"]["multiturn"][variant]
        assert entry["with_reuse"]["prefilled_tokens"] == expected, entry
        without = entry["without_reuse"]
        assert without["prefilled_tokens"] == without["prompt_tokens"] > 4 * expected


def test_scenarios_run_alone(tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "benchmarks.run", "--scale", "tiny", "--scenarios", "multiturn",
        "--runtimes", "mimo-mlx", "--variants", "float", "--runs", "1", "--warmup", "0",
        "--decode-tokens", "4", "--no-kernels", "--no-openblas", "--cache", str(tmp_path / "c"),
        "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["results"]["vision"] == {} and report["results"]["generate"] == {}
    assert set(report["results"]) == {"vision", "generate", "multiturn"}
    assert report["results"]["multiturn"]["float"]["speedup"] > 0
    text = (out / "results.md").read_text()
    assert "## Multi-turn" in text and "## Vision tower" not in text
    assert "## Generation" not in text and not (out / "results.png").exists()


def test_unknown_scenario_is_refused():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--scenarios", "vision,speed"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "unknown speed" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_kv_cache_scenario_reports_every_cache(tmp_path):
    out = tmp_path / "kv.json"
    command = [
        sys.executable, "-m", "benchmarks.kv_cache", "--scale", "tiny", "--layers", "1",
        "--tokens", "300", "--decode", "3", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["cache"]: row for row in json.loads(out.read_text())["results"]}
    assert list(rows) == ["float", "8bit", "4bit"]
    assert not rows["float"]["quantized"] and rows["8bit"]["quantized"]
    # bfloat16, head dim 64, groups of 64: 128 bytes a head in full precision, 64 + 4 in 8 bits
    assert rows["float"]["bf16_bytes_per_token_layer"] == 2 * 2 * 128
    assert rows["8bit"]["bf16_bytes_per_token_layer"] == 2 * 2 * (64 + 4)
    assert rows["4bit"]["bf16_bytes_per_token_layer"] == 2 * 2 * (32 + 4)
    for row in rows.values():
        assert (
            row["cache_tokens"] == 300 + 3 - 1 and row["peak_bytes"] > 0 and row["decode_tps"] > 0
        )


def test_the_structured_output_scenario_runs(tmp_path):
    from benchmarks import structured  # noqa: PLC0415

    report = structured.main(
        ["--scale", "tiny", "--tokens", "8", "--runs", "1", "--out", str(tmp_path)]
    )
    result = json.loads((tmp_path / "results.json").read_text())["result"]
    assert result == json.loads(json.dumps(report["result"]))
    assert result["plain_tok_s"]["median"] > 0 and result["json_schema_tok_s"]["median"] > 0
    assert len(result["grammar_s_per_token"]["values"]) == 7
    assert result["answer_start"].lstrip().startswith("{")
