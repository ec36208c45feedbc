"""mlx-vlm, through its own loader, vision tower and `generate_step` (greedy, no end-token stop)."""

from __future__ import annotations

import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_vlm.generate.ar import generate_step
from mlx_vlm.utils import load_model

from .. import recipes
from . import mlx_common
from .base import MemoryReading


def lazy_model(folder: Path, dtype: str):
    """mlx-vlm's model for an HF float folder or an mlx-vlm conversion, parameters still lazy."""
    model = load_model(Path(folder), lazy=True)
    mlx_common.cast_floats(model, dtype)
    return model


class Vision:
    def __init__(self, folder: Path, dtype: str):
        self.model = lazy_model(folder, dtype)
        mx.eval(self.model.vision_tower.parameters())
        self.dtype = mlx_common.DTYPES[dtype]

    def forward(self, pixels: np.ndarray, grid: np.ndarray) -> mx.array:
        # The cast mlx-vlm's Model.get_input_embeddings applies before its tower.
        pixels = mx.array(pixels).astype(self.dtype)
        return self.model.vision_tower(pixels, mx.array(grid), output_hidden_states=False)

    def encode(self, pixels: np.ndarray, grid: np.ndarray) -> None:
        mx.eval(self.forward(pixels, grid))

    reset_peak = staticmethod(mlx_common.reset_peak)

    def peak(self) -> MemoryReading:
        return mlx_common.peak()


class Generate:
    def __init__(self, folder: Path, dtype: str, recipe: str | None = None):
        if recipe is not None and recipe != recipes.MLX_VLM_4BIT:
            raise ValueError(f"mlx-vlm makes its 4-bit variant with {recipes.MLX_VLM_4BIT}")
        self.model = recipes.mlx_vlm_4bit(folder, dtype) if recipe else lazy_model(folder, dtype)
        mx.eval(self.model.parameters())

    def generate(
        self, ids: np.ndarray, pixels: np.ndarray, grid: np.ndarray, tokens: int
    ) -> list[tuple[int, float]]:
        steps = generate_step(
            mx.array(ids),
            self.model,
            mx.array(pixels),
            None,
            max_tokens=tokens,
            temperature=0.0,
            image_grid_thw=mx.array(grid),
        )
        return [(int(token), time.perf_counter()) for token, _ in steps]

    reset_peak = staticmethod(mlx_common.reset_peak)

    def peak(self) -> MemoryReading:
        return mlx_common.peak()
