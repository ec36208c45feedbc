"""The per-backend policies: which attention is fused, how the vision tower is scheduled, and what
generation does on Apple silicon (and does not do elsewhere)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_generate import write_model_folder

import mimo_mlx
from mimo_mlx.model import backend, vision
from mimo_mlx.model.backend import (
    VisionSchedule,
    fused_attention,
    prefill_schedule,
    vision_schedule,
)
from mimo_mlx.model.windows import frame_groups, frame_lengths


@pytest.mark.parametrize(
    "kind, dtype, head_dim, queries, fused",
    [
        ("cpu", mx.bfloat16, 80, 9216, False),  # the CPU always builds the scores
        ("cpu", mx.float32, 128, 4, True),  # a few decode queries hold a few score rows
        ("metal", mx.bfloat16, 80, 9216, True),  # MiMo-VL's vision head dim
        ("metal", mx.float32, 80, 9216, True),
        ("metal", mx.float16, 128, 512, True),  # the decoder's head dim
        ("metal", mx.bfloat16, 16, 512, False),  # tiny test models' head dim
        ("metal", mx.bfloat16, 256, 512, False),  # MLX prefers its unfused path there
        ("cuda", mx.bfloat16, 80, 9216, True),  # cuDNN
        ("cuda", mx.float16, 128, 512, True),
        ("cuda", mx.float32, 80, 9216, False),  # cuDNN has no float32 path
        ("cuda", mx.bfloat16, 132, 512, False),
    ],
)
def test_fused_attention_follows_mlx_routing(kind, dtype, head_dim, queries, fused):
    assert fused_attention(kind, dtype, head_dim, queries) is fused


def test_vision_schedule_per_backend():
    """Fused attention: overlapped stretches of a block's steps (one each at 1344x1344); else
    every half-block in evaluated pieces."""
    big = 9216  # a 1344x1344 image, through MiMo-VL's tower
    for kind, dtype in (("metal", mx.bfloat16), ("metal", mx.float16), ("cuda", mx.bfloat16)):
        schedule = vision_schedule(kind, dtype, 80, big, big, 1280, 3456)
        assert schedule == VisionSchedule(group_patches=big, steps_per_eval=1, overlapped=True)
    for kind, dtype in (("cpu", mx.float32), ("cpu", mx.bfloat16), ("cuda", mx.float32)):
        schedule = vision_schedule(kind, dtype, 80, big, big, 1280, 3456)
        assert schedule.rows and schedule.score_budget and not schedule.steps_per_eval


# MiMo-VL's tower in bfloat16 (weights 1.37 GB): the pass's grid, the bound it must keep above
# its weights, and how many of a block's three steps Metal and CUDA run between evaluations.
FULL_SCALE_PASSES = {
    "448x448": ([[1, 32, 32]], None, 7),
    "1024x1024": ([[1, 74, 74]], 0.6e9, 1),
    "1344x1344": ([[1, 96, 96]], 1.0e9, 1),
    "128-frame video": ([[64, 32, 32]], 1.5e9, 1),  # the default 448x448 frames, in pairs
}


def test_a_vision_block_holds_what_the_h200_measured():
    """`block_bytes` is calibrated on one full-attention block of MiMo-VL's tower run alone on an
    H200 (benchmarks/published/h200-cuda-full/probes/policies.json): 0.646 GB at 1344x1344,
    0.384 GB at 1024x1024, within 2%."""
    for patches, measured in ((9216, 0.646e9), (5476, 0.384e9)):
        assert abs(backend.block_bytes(patches, 1280, 3456, 2) / measured - 1) < 0.02


@pytest.mark.parametrize("kind", ["metal", "cuda"])
@pytest.mark.parametrize("name", list(FULL_SCALE_PASSES))
def test_gpu_vision_schedule_at_full_scale(kind, name):
    """On the GPU backends MiMo-VL's tower runs in overlapped stretches of a block's steps (one
    at 1024x1024 and up; seven, two blocks and a third, at 448x448: a few syncs), and what it may
    hold stays within the pass's bound: three stretches alive (one running, one queued, one
    returning its buffers), the pixels, two hidden states of the group (a stretch's input and
    output), the features and one group's features (written into them)."""
    grid, bound, steps = FULL_SCALE_PASSES[name]
    hidden, intermediate, out, size = 1280, 3456, 4096, 2
    frames = frame_lengths(np.array(grid))
    patches = int(frames.sum())
    schedule = vision_schedule(
        kind, mx.bfloat16, 80, patches, int(frames.max()), hidden, intermediate
    )
    assert schedule.steps_per_eval == steps and schedule.overlapped and not schedule.rows
    group = max(int(g.prod(axis=1).sum()) for g in frame_groups(grid, schedule.group_patches))
    step = backend.block_bytes(group, hidden, intermediate, size) // backend.BLOCK_STEPS
    alive = 3 * steps * step
    features = patches // 4 * out * size
    held = alive + patches * 1176 * size + 2 * group * hidden * size + features
    held += group // 4 * out * size
    assert bound is None or held <= bound, f"{held / 1e9:.2f} GB"
    if name == "128-frame video":
        assert group == 7 * 1024  # 10 groups of whole frames


def test_gpu_prefill_schedule():
    """A 512-token prefill chunk of MiMo-VL in bfloat16 on Metal or CUDA is evaluated every 3 of
    its 36 layers: 76 MB a layer, 0.23 GB at once whatever the depth. The CPU frees as it goes."""
    for kind in ("metal", "cuda"):
        assert prefill_schedule(kind, mx.bfloat16, 512, 4096, 11008) == 3
        assert prefill_schedule(kind, mx.bfloat16, 4096, 4096, 11008) == 1  # one big chunk
        assert prefill_schedule(kind, mx.float32, 8, 4096, 11008) > 36  # a few tokens: one graph
    assert 3 * backend.held_bytes(512, 4096, 11008, 2) <= backend.PASS_BUDGET
    assert prefill_schedule("cpu", mx.bfloat16, 512, 4096, 11008) == 0


@pytest.mark.parametrize("patches", [16, 1024, 9216, 30000])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_pieces_stay_within_their_hidden_state_budgets(patches, dtype):
    """Where scores are materialized, one piece of per-token work (the MLP's gate, up and their
    product, `rows` tokens each) fits in the three hidden states of queries, keys and values the
    attention half holds anyway, one chunk of a frame's full-attention scores in two; the row
    pieces are as even as the count allows, 3 of them at MiMo-VL's widths."""
    hidden, intermediate, heads, size = 1280, 3456, 16, dtype.size
    schedule = vision_schedule("cpu", dtype, 80, patches, patches, hidden, intermediate)
    state = patches * hidden * size
    assert 3 * schedule.rows * intermediate * size <= 3 * state
    pieces = -(-patches // schedule.rows)
    assert pieces * schedule.rows - patches < pieces
    if patches >= 1024:
        assert pieces == 3
    chunk = schedule.query_chunk(heads, 1, patches, size) or patches
    assert chunk * heads * patches * size <= 2 * state


def test_query_chunks_keep_scores_under_the_budget():
    schedule = VisionSchedule(score_budget=64 * 2**20)
    chunk = schedule.query_chunk(heads=16, segments=1, size=9216, itemsize=4)
    assert chunk * 16 * 9216 * 4 <= 64 * 2**20 < (chunk + 1) * 16 * 9216 * 4
    assert schedule.query_chunk(heads=16, segments=100, size=64, itemsize=4) is None  # windows
    assert VisionSchedule(steps_per_eval=1).query_chunk(16, 1, 9216, 4) is None


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return mimo_mlx.load(write_model_folder(tmp_path_factory.mktemp("backend"), seed=4))


class Spy:
    """Wraps a function of mlx.core, recording each call's arguments."""

    def __init__(self, monkeypatch, name: str, result=None):
        self.calls: list[tuple] = []
        original = getattr(mx, name)

        def spy(*args, **kwargs):
            self.calls.append(args)
            return original(*args, **kwargs) if result is None else result

        monkeypatch.setattr(mx, name, spy)


def test_prepared_prompt_runs_the_vision_schedule_of_its_backend(loaded, monkeypatch):
    """`prepare_prompt` encodes under the schedule `tower_schedule` gives the backend it runs on:
    on a (pretended) CUDA backend in float32, the pieces of unfused attention; features
    evaluated."""
    model, _ = loaded
    monkeypatch.setattr("mimo_mlx.model.mimo_vl.device_kind", lambda: "cuda")
    seen = []
    original = vision.encode
    monkeypatch.setattr(
        "mimo_mlx.model.mimo_vl.encode", lambda *args: seen.append(args[-1]) or original(*args)
    )
    grid = np.array([[1, 32, 32]])
    ids = np.array([[5, *[model.config.image_token_id] * 256, 6]])
    pixels = np.zeros((1024, 1176), np.float32)
    model.prepare_prompt(ids, pixel_values=pixels, image_grid_thw=grid)
    hidden, intermediate = model.config.vision.hidden_size, model.config.vision.intermediate_size
    expected = vision_schedule("cuda", mx.float32, 16, 1024, 1024, hidden, intermediate)
    assert seen == [expected] and expected.rows


def test_cpu_vision_pass_is_evaluated_in_pieces(loaded, monkeypatch):
    """On the CPU even a 448x448 image runs in evaluated pieces: rows of per-token work in every
    half-block, query chunks in full attention."""
    model, _ = loaded
    evals = Spy(monkeypatch, "eval")
    grid = np.array([[1, 32, 32]])
    ids = np.array([[5, *[model.config.image_token_id] * 256, 6]])
    model.prepare_prompt(ids, pixel_values=np.zeros((1024, 1176), np.float32), image_grid_thw=grid)
    assert len(evals.calls) > 4 * 2 * model.config.vision.depth


def generate_tokens(loaded, count: int) -> list[int]:
    model, processor = loaded
    return mimo_mlx.generate(model, processor, "Hi", max_tokens=count).tokens


def test_apple_silicon_generation_settings(loaded, monkeypatch):
    """Metal: a generation stream, the wired limit raised to the recommended working set and put
    back, the buffer cache released every CACHE_RELEASE_INTERVAL tokens."""
    monkeypatch.setattr(backend, "device_kind", lambda: "metal")
    monkeypatch.setattr(backend, "CACHE_RELEASE_INTERVAL", 4)
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 2**40})
    wired = Spy(monkeypatch, "set_wired_limit", result=777)
    streams = Spy(monkeypatch, "new_stream")
    cleared = Spy(monkeypatch, "clear_cache")
    tokens = generate_tokens(loaded, 9)
    assert len(streams.calls) == 1
    assert wired.calls == [(2**40,), (777,)]  # raised for generation, then restored
    # Released after every 4th token, once the caller asks for the next one.
    assert len(cleared.calls) == (len(tokens) - 1) // 4


def test_no_apple_silicon_settings_elsewhere(loaded, monkeypatch):
    assert backend.device_kind() == "cpu"
    wired = Spy(monkeypatch, "set_wired_limit", result=0)
    streams = Spy(monkeypatch, "new_stream")
    cleared = Spy(monkeypatch, "clear_cache")
    monkeypatch.setattr(backend, "CACHE_RELEASE_INTERVAL", 2)
    generate_tokens(loaded, 6)
    assert wired.calls == streams.calls == cleared.calls == []


def test_rope_kernel_only_where_mlx_has_one():
    assert backend.rope_kernel("metal") and backend.rope_kernel("cuda")
    assert not backend.rope_kernel("cpu")


@pytest.mark.parametrize("starts", [0, 37, np.array([3, 40])])
@pytest.mark.parametrize("length", [1, 5])
def test_text_rotation_without_the_kernel_equals_the_kernel(loaded, starts, length):
    """The CPU's once-per-pass table rotates exactly as `mx.fast.rope` (what Metal and CUDA run)."""
    model, _ = loaded
    rope, config = model.model._rope, model.config.text
    offsets = starts if isinstance(starts, int) else mx.array(starts.astype(np.int32))
    x = mx.random.normal(
        (2, config.num_attention_heads, length, config.head_dim), key=mx.random.key(1)
    )
    fused = rope(offsets, mx.float32, length, kernel=True)
    table = rope(offsets, mx.float32, length, kernel=False)
    np.testing.assert_allclose(np.array(table(x)), np.array(fused(x)), atol=1e-5)
    # The last rows alone (the queries of a pass that keeps only its last token's logits).
    last = x[:, :, -1:]
    np.testing.assert_allclose(np.array(fused(last)), np.array(fused(x)[:, :, -1:]), atol=1e-5)
    np.testing.assert_allclose(np.array(table(last)), np.array(table(x)[:, :, -1:]), atol=1e-5)


def test_decoding_with_the_rope_kernel_gives_the_same_logits(loaded, monkeypatch):
    """The Metal/CUDA rotary path through the whole model: prefill and decode logits equal the CPU
    path's (which the transformers parity tests check)."""
    model, _ = loaded
    ids = np.array([[5, 9, 14, 3, 7, 21, 8]])

    def logits(kernel: bool) -> np.ndarray:
        monkeypatch.setattr("mimo_mlx.model.language.rope_kernel", lambda kind: kernel)
        cache = model.make_cache()
        rows = [model(ids[:, :5], cache=cache)[0, -1]]
        rows += [model(ids[:, i : i + 1], cache=cache)[0, -1] for i in (5, 6)]
        rows.append(model(ids, logits_to_keep=1)[0, -1])  # the last layer's queries: one row
        return np.array(mx.stack(rows))

    np.testing.assert_allclose(logits(True), logits(False), atol=1e-4)
