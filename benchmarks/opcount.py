"""How many MLX operations one vision forward pass builds: op nodes of the lazy output's graph.

`mx.export_to_dot` writes the graph from the output back to evaluated arrays (the weights, the
pixels); every primitive is one rectangle node. mimo-mlx evaluates part of the pass eagerly on
large inputs (full-attention query chunks when a frame's scores exceed
`mimo_mlx.vision.SCORE_BUDGET_BYTES`; each half-block above `EAGER_PATCHES` patches), which would
cut the graph; for counting those thresholds are raised so the whole pass stays one lazy graph.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

import mimo_mlx.vision

# mimo_mlx.vision's thresholds above which it evaluates eagerly; raised while counting.
EAGER_KNOBS = ("SCORE_BUDGET_BYTES", "EAGER_PATCHES")
NO_LIMIT = 1 << 62


def count_graph_ops(output: mx.array) -> dict:
    """{"ops": op nodes, "by_op": count per primitive name} of the graph behind `output`."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "graph.dot"
        mx.export_to_dot(str(path), output)
        labels = [
            line.split('label ="', 1)[1].split('"', 1)[0]
            for line in path.read_text().splitlines()
            if "shape=rectangle" in line
        ]
    by_op: dict[str, int] = {}
    for label in labels:
        by_op[label] = by_op.get(label, 0) + 1
    return {"ops": len(labels), "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1]))}


def count_vision_ops(runtime: str, runner, pixels: np.ndarray, grid: np.ndarray) -> dict:
    """Op count of `runner.forward` (a Vision runner of mimo-mlx or mlx-vlm) on one image."""
    if runtime == "torch":
        return {"ops": None, "note": "not an MLX graph"}
    knobs = [k for k in EAGER_KNOBS if hasattr(mimo_mlx.vision, k)]
    saved = {k: getattr(mimo_mlx.vision, k) for k in knobs}
    for knob in knobs:
        setattr(mimo_mlx.vision, knob, NO_LIMIT)
    try:
        counted = count_graph_ops(runner.forward(pixels, grid))
    finally:
        for knob, value in saved.items():
            setattr(mimo_mlx.vision, knob, value)
    note = ""
    if runtime == "mimo-mlx":
        note = f"{' and '.join(knobs)} raised so the pass is one lazy graph"
    return {**counted, "note": note}
