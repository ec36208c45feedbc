"""mimo-mlx, through its public pieces: the model, `prepare_prompt`, `generate_step` (greedy)."""

from __future__ import annotations

import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mimo_mlx.generation.loop import generate_step
from mimo_mlx.generation.sampling import make_sampler
from mimo_mlx.loading import load_model
from mimo_mlx.model.mimo_vl import Model

from .. import recipes
from . import mlx_common
from .base import MemoryReading


def lazy_model(folder: Path, dtype: str) -> Model:
    """mimo-mlx's model with weights read only when first used, so a caller can materialize the
    vision tower alone (the full float32 decoder does not fit in 24 GB; the tower does)."""
    return load_model(folder, dtype=dtype, lazy=True)


def load_variant(folder: Path, dtype: str, recipe: str | None = None) -> Model:
    """The whole model, evaluated: the folder as it is, or quantized in memory by `recipe`."""
    if recipe is not None and recipe != recipes.MIMO_4BIT:
        raise ValueError(f"mimo-mlx makes its 4-bit variant with {recipes.MIMO_4BIT}, not {recipe}")
    loaded = recipes.mimo_4bit(folder, dtype) if recipe else lazy_model(folder, dtype)
    mx.eval(loaded.parameters())
    return loaded


class Vision:
    def __init__(self, folder: Path, dtype: str):
        self.model = lazy_model(folder, dtype)
        mx.eval(self.model.visual.parameters())

    def forward(self, pixels: np.ndarray, grid: np.ndarray) -> mx.array:
        """The whole pass as one lazy graph (for counting graph nodes)."""
        return self.model.visual(mx.array(pixels), grid)

    def encode(self, pixels: np.ndarray, grid: np.ndarray) -> None:
        """The pass as generation runs it: under this backend's memory schedule."""
        mx.eval(self.model.encode_vision(pixels, grid))

    reset_peak = staticmethod(mlx_common.reset_peak)

    def peak(self) -> MemoryReading:
        return mlx_common.peak()


class Generate:
    def __init__(self, folder: Path, dtype: str, recipe: str | None = None):
        self.model = load_variant(folder, dtype, recipe)
        self.sampler = make_sampler(0.0)

    def generate(
        self, ids: np.ndarray, pixels: np.ndarray, grid: np.ndarray, tokens: int
    ) -> list[tuple[int, float]]:
        cache = self.model.make_cache()
        prompt = self.model.prepare_prompt(
            ids, pixel_values=pixels, image_grid_thw=grid, cache=cache
        )
        # generate_step never stops on an end token: the caller decides, so all runtimes decode `tokens`.
        steps = generate_step(
            prompt, self.model, max_tokens=tokens, sampler=self.sampler, prompt_cache=cache
        )
        return [(token, time.perf_counter()) for token, _ in steps]

    reset_peak = staticmethod(mlx_common.reset_peak)

    def peak(self) -> MemoryReading:
        return mlx_common.peak()
