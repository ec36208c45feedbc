"""The per-backend policies: which attention is fused, how the vision tower is scheduled, and what
generation does on Apple silicon (and does not do elsewhere)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_generate import write_model_folder

import mimo_mlx
from mimo_mlx.model import backend
from mimo_mlx.model.backend import VisionSchedule, fused_attention, vision_schedule


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
    big = 9216  # a 1344x1344 image, through MiMo-VL's tower
    for kind, dtype in (("metal", mx.bfloat16), ("metal", mx.float16), ("cuda", mx.bfloat16)):
        schedule = vision_schedule(kind, dtype, 80, big, big, 1280, 3456)
        assert schedule == VisionSchedule(one_graph=True)
    for kind, dtype in (("cpu", mx.float32), ("cpu", mx.bfloat16), ("cuda", mx.float32)):
        assert not vision_schedule(kind, dtype, 80, big, big, 1280, 3456).one_graph


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
    schedule = VisionSchedule(one_graph=False, score_budget=64 * 2**20)
    chunk = schedule.query_chunk(heads=16, segments=1, size=9216, itemsize=4)
    assert chunk * 16 * 9216 * 4 <= 64 * 2**20 < (chunk + 1) * 16 * 9216 * 4
    assert schedule.query_chunk(heads=16, segments=100, size=64, itemsize=4) is None  # windows
    assert VisionSchedule(one_graph=True).query_chunk(16, 1, 9216, 4) is None


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


def test_half_precision_gpu_vision_pass_is_one_lazy_graph(loaded, monkeypatch):
    """Under the schedule Metal and CUDA get in half precision, preparing a prompt with a
    1344x1344 image builds the whole vision pass without a single host sync."""
    model, _ = loaded
    schedule = vision_schedule("metal", mx.bfloat16, 80, 9216, 9216, 1280, 3456)
    monkeypatch.setattr("mimo_mlx.model.mimo_vl.vision_schedule", lambda *args, **kwargs: schedule)
    evals, items = Spy(monkeypatch, "eval"), []
    monkeypatch.setattr(mx.array, "item", lambda self: items.append(1))
    grid = np.array([[1, 96, 96]])
    ids = np.array([[5, *[model.config.image_token_id] * 2304, 6]])
    pixels = np.zeros((9216, 1176), np.float32)
    prompt = model.prepare_prompt(ids, pixel_values=pixels, image_grid_thw=grid)
    assert evals.calls == [] and items == []
    assert prompt.vision_features.shape == (2304, model.config.text.hidden_size)


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
