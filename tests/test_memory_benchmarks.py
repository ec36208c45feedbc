"""The memory benchmarks run, on the schedule of the backend they run on (one full-width block)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from benchmarks import vision_memory


def test_vision_memory_measures_the_backends_schedule(tmp_path):
    out = tmp_path / "vision.json"
    result = CliRunner().invoke(
        vision_memory.main, ["--size", "56", "--depth", "1", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    measured = json.loads(out.read_text())
    assert measured["grid_thw"] == [[1, 4, 4]] and measured["patches"] == 16
    assert measured["device"] == "cpu" and measured["schedule"]["rows"] > 0  # the CPU's pieces
    assert 0 < measured["above_weights_bytes"] < measured["vision_weight_bytes"]
    assert measured["bound_met"] is None  # bounds are stated for 1024, 1344 and 128 frames


def test_the_default_video_is_65536_patches():
    assert vision_memory.pass_grid(None, 128).tolist() == [[64, 32, 32]]
    assert vision_memory.pass_grid(1344, None).tolist() == [[1, 96, 96]]


def test_vision_memory_refuses_an_image_and_a_video():
    result = CliRunner().invoke(vision_memory.main, ["--size", "448", "--video", "4"])
    assert result.exit_code != 0 and "not both" in result.output


def test_vision_memory_one_graph_is_the_before_of_the_same_pass(tmp_path):
    """--schedule one-graph measures the pass as one lazy graph (before #22), warmed up and timed
    over --runs passes, so a GPU run can set it beside the backend's schedule."""
    out = tmp_path / "one-graph.json"
    result = CliRunner().invoke(
        vision_memory.main,
        [
            "--size",
            "56",
            "--depth",
            "1",
            "--schedule",
            "one-graph",
            "--runs",
            "2",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    measured = json.loads(out.read_text())
    assert measured["schedule_name"] == "one-graph"
    assert measured["schedule"] == {
        "group_patches": 0,
        "steps_per_eval": 0,
        "overlapped": False,
        "rows": 0,
        "score_budget": 0,
    }
    assert len(measured["runs_s"]) == 2 and min(measured["runs_s"]) <= measured["seconds"]


def test_every_evaluation_policy_of_the_gpu_probe_computes_the_same_features():
    """benchmarks/gpu/eval_policies.py times the tower under policies that differ only in when
    they evaluate: each must give the one-graph pass's features (windows and full attention)."""
    import mlx.core as mx
    import numpy as np

    from benchmarks.gpu.eval_policies import run_pass, schedules
    from mimo_mlx.model.config import VisionConfig
    from mimo_mlx.model.vision import VisionModel

    config = VisionConfig(
        depth=4, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=40,
        fullatt_block_indexes=(1, 3),
    )  # fmt: skip
    tower = VisionModel(config)
    grid = np.array([[1, 12, 8]])
    pixels = mx.random.normal((96, config.patch_dim), key=mx.random.key(0))
    named = schedules(tower, grid)
    expected = np.array(run_pass(tower, pixels, grid, named.pop("one-graph")))
    assert len(named) == 10
    for name, schedule in named.items():
        ours = np.array(run_pass(tower, pixels, grid, schedule))
        np.testing.assert_allclose(ours, expected, atol=1e-5, err_msg=name)
