"""The harness's prompt-lookup scenario (benchmarks/lookup.py) on a tiny model: the copier copies,
the plain tasks have nothing to copy, and the report section and targets read its results.
(The whole harness, this scenario included, runs in test_benchmarks_smoke.py.)"""

from __future__ import annotations

import pytest
from tiny_models import save_checkpoint, tiny_hf_model

from benchmarks.lookup import TASKS, measure
from benchmarks.report.sections import lookup as lookup_section
from benchmarks.report.targets import lookup_targets
from mimo_mlx import load_model


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    model = load_model(save_checkpoint(tiny_hf_model(seed=54), tmp_path_factory.mktemp("pl-bench")))
    return measure(model, image_size=56, answer_tokens=48, warmup=0, runs=1)


def test_each_task_with_and_without_lookup(measured):
    tasks = measured["tasks"]
    assert set(tasks) == set(TASKS)
    for name, task in tasks.items():
        assert task["identical"] and task["answer_follows_chain"], name
        assert task["without"]["tokens_per_pass"] == 1.0
        assert task["with"]["decode_tps"]["median"] > 0 and task["speedup"] > 0
    copy = tasks["copy"]["with"]
    assert copy["tokens_per_pass"] > 4 and copy["accepted"] >= 36  # 4 tokens watch first
    for name in ("plain", "shuffled"):  # nothing to copy: no draft is ever verified
        assert tasks[name]["with"]["tokens_per_pass"] == 1.0 and tasks[name]["with"]["drafted"] == 0


def test_report_section_and_targets(measured):
    results = {"float": measured, "4bit": {"error": "exit 1"}}
    lines = lookup_section.section({"results": {"prompt_lookup": results}})
    text = "\n".join(lines)
    assert "## Prompt lookup" in text and "not MiMo-VL's acceptance rates" in text
    assert "| float | copy | with |" in text and "| 4bit | failed: exit 1 |" in text
    found = {t["target"]: t for t in lookup_targets(results)}
    assert found["prompt lookup: the same greedy tokens on every task (float)"]["met"]
    copy = found["prompt lookup, copy task: tok/s >= 1.5x without (float)"]
    assert copy["measured"] == f"{measured['tasks']['copy']['speedup']:.2f}x"
    assert "prompt lookup, plain task: tok/s >= 0.95x without (float)" in found
