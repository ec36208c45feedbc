"""How many MLX operations one vision forward pass builds: op nodes of the lazy output's graph.

`mx.export_to_dot` writes the graph from the output back to evaluated arrays (the weights, the
pixels); every primitive is one rectangle node. Each runner's `forward` builds its whole pass as one
lazy graph (mimo-mlx's is what Metal and CUDA in half precision run; on the CPU the same operations
are evaluated in pieces).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np


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
    return count_graph_ops(runner.forward(pixels, grid))
