"""The harness's prompt-lookup scenario (benchmarks/lookup.py) on a tiny model: the copier copies,
the plain tasks have nothing to copy, and the report section and targets read its results.
(The whole harness, this scenario included, runs in test_benchmarks_smoke.py.)"""

from __future__ import annotations

import pytest
from tiny_models import save_checkpoint, tiny_hf_model

from benchmarks.lookup import TASKS, measure
from benchmarks.report.sections import lookup as lookup_section
from benchmarks.report.sections import lookup_time, pass_cost
from benchmarks.report.targets import lookup_targets
from mimo_mlx import load_model
from mimo_mlx.generation import loop
from mimo_mlx.generation.pass_cost import PassCost


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """The scenario on a tiny model; lookup's pass cost is a flat one (every pass costs a step),
    so whether it drafts never depends on the machine's load (the scenario's own pass-cost table
    is measured for real)."""
    model = load_model(save_checkpoint(tiny_hf_model(seed=54), tmp_path_factory.mktemp("pl-bench")))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "measure_pass_cost", lambda model, rows: PassCost.flat(rows))
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


def test_where_the_time_went(measured):
    cost = measured["pass_cost"]
    assert cost["rows"] == list(range(1, 17)) and cost["pass_ratio"][0] == 1.0
    assert len(cost["first_call_s"]) == len(cost["pass_s"]) == 16
    assert len(cost["probe_ratio"]) == 16 and cost["probe_ratio"][0] == 1.0
    assert set(measured["phases_s"]) == {"follow_chain", "pass_cost", *TASKS}
    for task in measured["tasks"].values():
        seconds = task["with"]["seconds"]
        parts = sum(seconds[k]["median"] for k in ("drafting", "verifying", "trimming"))
        parts += seconds["measuring"]["median"] + seconds["steps"]["median"]
        assert abs(parts - seconds["decode"]["median"]) < 1e-6  # one answer: the parts add up
        assert task["without"]["seconds"]["steps"] == task["without"]["seconds"]["decode"]
    copy = measured["tasks"]["copy"]["with"]
    assert copy["verifications"] > 0 and copy["seconds"]["verifying"]["median"] > 0
    assert copy["seconds"]["measuring"]["median"] > 0  # once per answer, at its first draft


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
    report = {"results": {"prompt_lookup": results}}
    times = "\n".join(lookup_time.section(report))
    assert (
        "## Where prompt lookup's decode time went" in times and "| float | copy | with |" in times
    )
    costs = "\n".join(pass_cost.section(report))
    assert "## A forward pass over k tokens against one" in costs and "\n| 16 | " in costs
    cut_short = {"float": {"error": "timed out", "partial": {"pass_cost": measured["pass_cost"]}}}
    assert "| 16 | " in "\n".join(pass_cost.section({"results": {"prompt_lookup": cut_short}}))
