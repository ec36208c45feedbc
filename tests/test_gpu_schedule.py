"""The memory schedule Metal and CUDA get, run on the CPU.

A GPU backend may hold every intermediate of an evaluated graph until the graph has run (one lazy
vision pass held 12.4 GB over its weights on an H200), which the CPU, freeing as it goes, never
shows. What the CPU can check is the schedule: under the GPU's plan a vision pass and a prefill
are evaluated as they go (at least every two blocks or layers), hold no more with more depth,
and give the one-graph result. The budget is scaled to the tiny widths (`budget`): at MiMo-VL's
widths the default gives every block at 1024x1024 and up (tests/test_backend.py).
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import numpy as np
import pytest

from mimo_mlx.generation import loop
from mimo_mlx.generation.loop import generate_step
from mimo_mlx.model.backend import (
    BLOCK_STEPS,
    VisionSchedule,
    block_bytes,
    held_bytes,
    prefill_schedule,
)
from mimo_mlx.model.config import ModelConfig, TextConfig, VisionConfig
from mimo_mlx.model.language import DecoderLayer
from mimo_mlx.model.mimo_vl import Model
from mimo_mlx.model.vision import VisionBlock, VisionModel, encode, tower_schedule
from mimo_mlx.model.windows import frame_lengths

# Head dim 64: attention Metal fuses in any dtype and cuDNN in half precision.
VISION = dict(hidden_size=128, num_heads=2, intermediate_size=192, out_hidden_size=128)
GRID = np.array([[1, 16, 16], [2, 8, 8]])  # an image and a 4-frame video: 256 + 64 + 64 patches
PATCHES = int(frame_lengths(GRID).sum())
GPU_KINDS = [("metal", mx.float32), ("cuda", mx.bfloat16)]


def tower(depth: int, dtype: mx.Dtype) -> VisionModel:
    full = tuple(range(3, depth, 4))  # every 4th block attends within frames, as in MiMo-VL
    mx.random.seed(depth)
    model = VisionModel(VisionConfig(depth=depth, fullatt_block_indexes=full, **VISION))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def pixels(dtype: mx.Dtype) -> mx.array:
    values = mx.random.normal((PATCHES, 3 * 2 * 14 * 14), key=mx.random.key(0)).astype(dtype)
    mx.eval(values)
    return values


class Trace:
    """Records, in order, each call of the layers' own methods (`methods` of `layer`: a decoder
    layer's `segments`, which its `__call__` runs too, a vision block's steps) and each
    evaluation."""

    def __init__(self, monkeypatch, layer: type, methods: tuple[str, ...] = ("__call__",)):
        self.events: list[str] = []
        for name in ("eval", "async_eval"):
            monkeypatch.setattr(mx, name, self._recorded(name, getattr(mx, name)))
        for name in methods:
            monkeypatch.setattr(layer, name, self._recorded("layer", getattr(layer, name)))

    def _recorded(self, event: str, function):
        def recorded(*args, **kwargs):
            self.events.append(event)
            return function(*args, **kwargs)

        return recorded

    def longest_unevaluated_run(self) -> int:
        """The most layer calls between two evaluations (queued or waited for)."""
        runs = "".join("L" if e == "layer" else "|" for e in self.events).split("|")
        return max(len(run) for run in runs)


def evaluated(model: VisionModel, values: mx.array, schedule: VisionSchedule) -> None:
    mx.eval(encode(model, values, GRID, schedule))


def peak_above(run) -> int:
    """Peak bytes allocated while `run()` runs, above what was allocated before it (the least of
    three runs)."""
    peaks = []
    for _ in range(3):
        mx.clear_cache()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        run()
        peaks.append(mx.get_peak_memory() - before)
    return min(peaks)


def assert_flat(peaks: list[int], depths: tuple[int, int], state: int) -> None:
    """The peak does not grow with depth: by less than half a float32 hidden state (`state`
    bytes) per block (layer) added. The CPU frees on its own thread, so the same pass peaks up to
    a few float32 hidden states apart from run to run, in bfloat16 too (rotary embedding and
    softmax run in float32): the evaluation cadence above is the sharper check."""
    grown = peaks[1] - peaks[0]
    assert grown < (depths[1] - depths[0]) / 2 * state, f"peaks {peaks} at depths {depths}"


# Budgets in patches' worth of a block's steps: six steps of the whole pass (one group, evaluated
# every two blocks), and less than one (its frames run in groups, the image alone, then the
# video's frames, each evaluated every step).
@pytest.mark.parametrize("kind, dtype", GPU_KINDS)
@pytest.mark.parametrize("budget, steps", [(6 * PATCHES, 6), (200, 1)])
def test_vision_pass_is_evaluated_as_it_goes(monkeypatch, kind, dtype, budget, steps):
    """Under the schedule a GPU backend gets, the pass runs through the three steps of each
    block, each stretch queued before the host waits for the one before it (never more than two
    in flight); its peak does not grow with depth; its features equal the one-graph pass's."""
    per_step = block_bytes(1, VISION["hidden_size"], VISION["intermediate_size"], dtype.size)
    per_step //= BLOCK_STEPS
    peaks = []
    for depth in (4, 16):
        model, values = tower(depth, dtype), pixels(dtype)
        schedule = tower_schedule(model, GRID, kind, budget=budget * per_step)
        assert schedule.steps_per_eval == steps and schedule.overlapped and not schedule.rows
        with monkeypatch.context() as patch:
            trace = Trace(patch, VisionBlock, ("project", "attend", "feed_forward"))
            features = encode(model, values, GRID, schedule)
        groups = 2 if budget < PATCHES else 1
        assert trace.events.count("layer") == BLOCK_STEPS * depth * groups
        assert trace.longest_unevaluated_run() <= steps <= 2 * BLOCK_STEPS  # every 2 blocks
        stretches = BLOCK_STEPS * depth // steps - 1  # a group's; the last rides with the merger
        assert trace.events.count("async_eval") == groups * stretches
        in_flight, most = 0, 0  # stretches queued and not yet waited for
        for event in trace.events:  # an evaluation waits at least for all but the last queued
            in_flight = in_flight + 1 if event == "async_eval" else min(in_flight, 1)
            most = max(most, in_flight)
        assert most == min(stretches, 2)  # the next is queued before the host waits
        one_graph = encode(model, values, GRID, VisionSchedule())
        tolerance = 1e-5 if dtype == mx.float32 else 2e-2
        np.testing.assert_allclose(
            np.array(features.astype(mx.float32)),
            np.array(one_graph.astype(mx.float32)),
            atol=tolerance * float(mx.abs(one_graph).max()),
        )
        peaks.append(peak_above(partial(evaluated, model, values, schedule)))
    assert_flat(peaks, (4, 16), PATCHES * VISION["hidden_size"] * 4)


def decoder(layers: int) -> Model:
    text = TextConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        mrope_section=(8, 12, 12),
        max_position_embeddings=4096,
    )
    vision = VisionConfig(depth=1, **VISION)
    mx.random.seed(layers)
    model = Model(ModelConfig(text=text, vision=vision, image_token_id=500, video_token_id=501))
    mx.eval(model.parameters())
    return model


def image_prompt(model: Model):
    """A 300-token prompt with a 16x16-patch image (64 placeholders), features given."""
    rng = np.random.default_rng(0)
    ids = np.concatenate([rng.integers(0, 400, 100), np.full(64, 500), rng.integers(0, 400, 136)])
    features = mx.random.normal((64, 128), key=mx.random.key(1))
    mx.eval(features)
    return model.prepare_prompt(
        ids[None], image_grid_thw=np.array([[1, 16, 16]]), vision_features=features
    )


def first_token(monkeypatch, model: Model, kind: str, budget: int, trace: bool = False):
    """The first token's log-probabilities after prefilling `image_prompt` in 64-token chunks
    through `generate_step`, on (pretended) backend `kind` with the prefill budget `budget`; the
    cache; the trace of layers and evaluations."""
    with monkeypatch.context() as patch:
        patch.setattr(loop, "device_kind", lambda: kind)
        patch.setattr(loop, "prefill_schedule", partial(prefill_schedule, budget=budget))
        traced = Trace(patch, DecoderLayer, ("segments",)) if trace else None
        cache = model.make_cache()
        steps = generate_step(
            image_prompt(model), model, max_tokens=1, prompt_cache=cache, prefill_step_size=64
        )
        _, logprobs = next(steps)
        mx.eval(logprobs)
    return logprobs, cache, traced


@pytest.mark.parametrize("kind, every", [("metal", 1), ("cuda", 2)])
def test_prefill_is_evaluated_as_it_goes(monkeypatch, kind, every):
    """A 300-token prompt with an image, prefilled in 64-token chunks through `generate_step` on
    a (pretended) GPU backend: every chunk is evaluated every `every` layers, whatever the depth;
    its peak above the weights and the KV cache does not grow with the number of layers; the
    first token's log-probabilities equal the CPU's (one lazy graph per chunk)."""
    budget, peaks = every * held_bytes(64, 128, 256, 4), []
    for layers in (4, 16):
        model = decoder(layers)
        gpu, _, trace = first_token(monkeypatch, model, kind, budget, trace=True)
        assert trace.events.count("layer") == layers * 5  # 300 tokens in 5 chunks
        assert trace.longest_unevaluated_run() <= every
        cpu, _, _ = first_token(monkeypatch, model, "cpu", budget)
        np.testing.assert_allclose(np.array(gpu), np.array(cpu), atol=1e-5)
        run = partial(first_token, monkeypatch, model, kind, budget)
        peaks.append(peak_above(run) - run()[1].nbytes)
    assert_flat(peaks, (4, 16), 64 * 128 * 4)
