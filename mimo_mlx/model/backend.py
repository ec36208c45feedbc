"""What one backend needs, decided outside the layers: attention memory, the rotary kernel and
generation settings.

The layers build lazy graphs and never evaluate. Backends differ in ways that matter:

- Attention. Metal and CUDA (cuDNN, half precision) run `mx.fast.scaled_dot_product_attention` as a
  fused kernel that never holds the (queries x keys) score matrix. The CPU, and float32 on CUDA,
  build the full scores; one 1344x1344 image in full attention would take 5.4 GB of them. There the
  vision tower runs in evaluated pieces that each stay within a small budget (`vision_schedule`);
  elsewhere it is one lazy graph.
- Rotary embedding. Metal and CUDA run `mx.fast.rope` as one kernel; the CPU has none, so there the
  decoder builds its cos/sin table once per forward pass rather than once per layer (`rope_kernel`).
- Apple silicon. Generation pins the weights in memory (wired limit), runs on its own stream and
  returns freed buffers to the system every few hundred tokens, as mlx-lm does. Elsewhere these
  are no-ops.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_reduce

# Head dims of Metal's fused prefill kernel (query length > 8) that MLX routes to it; 192 and 256
# exist but MLX prefers its unfused path for them.
METAL_FUSED_HEAD_DIMS = (64, 72, 80, 96, 128)
# Where the tower runs in evaluated pieces, budgets in hidden states of the pass (patches x width).
# A query chunk's attention scores stay within SCORE_HIDDEN_STATES. A piece of per-token work (the
# MLP's gate, up and their product for `rows` tokens) stays within ROW_HIDDEN_STATES: the queries,
# keys and values the attention half holds for every token anyway, so it adds nothing to a
# block's peak. Measured on the CPU at small scale, above the pixels: a 448x448 image holds 22 MB
# instead of 105 MB as one lazy graph, 1344x1344 198 MB instead of 713 MB; 5, 3 or 2 row pieces
# peak the same, and fewer split the matmuls less (448x448: 0.96, 0.91, 0.89 s).
SCORE_HIDDEN_STATES = 2
ROW_HIDDEN_STATES = 3
# Apple silicon: return freed buffers to the system every this many generated tokens.
CACHE_RELEASE_INTERVAL = 256


def device_kind() -> str:
    """'cpu', 'metal' or 'cuda': the backend the default device runs on."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


def rope_kernel(kind: str) -> bool:
    """Whether `mx.fast.rope` is one kernel here. Metal and CUDA have one; on the CPU it falls back
    to ~20 small ops that recompute the angles on every call, so the decoder computes them once
    per forward pass instead (on a small-scale decode step: 426 ops instead of 573)."""
    return kind in ("metal", "cuda")


def fused_attention(kind: str, dtype: mx.Dtype, head_dim: int, queries: int) -> bool:
    """Whether MLX runs this attention as a fused kernel that never holds the score matrix.

    Mirrors MLX's routing for query lengths above 8 (prefill and vision); short queries (decode)
    hold only a few score rows either way.
    """
    if queries <= 8:
        return True
    if kind == "metal":
        return head_dim in METAL_FUSED_HEAD_DIMS
    if kind == "cuda":  # cuDNN: half precision, head dims that are multiples of 8 up to 128
        return dtype in (mx.float16, mx.bfloat16) and head_dim % 8 == 0 and head_dim <= 128
    return False


@dataclass(frozen=True)
class VisionSchedule:
    """How the vision tower runs on this backend.

    one_graph: the whole pass is one lazy graph (no host sync inside the tower).
    Otherwise every half-block runs in pieces, each evaluated before the next is built: the
    per-token work (norms, projections, rotary embedding, MLP) `rows` tokens at a time, attention
    in query chunks whose scores stay under `score_budget` bytes.
    """

    one_graph: bool
    rows: int = 0
    score_budget: int = 0

    def query_chunk(self, heads: int, segments: int, size: int, itemsize: int) -> int | None:
        """Queries per evaluated piece of an attention group of `segments` self-attention
        segments of `size` tokens each; None when the whole group is one piece."""
        if self.one_graph:
            return None
        per_query = itemsize * heads * segments * size  # bytes of one score row per segment
        chunk = max(1, self.score_budget // per_query)
        return None if chunk >= size else chunk


def vision_schedule(
    kind: str,
    dtype: mx.Dtype,
    head_dim: int,
    patches: int,
    longest_frame: int,
    hidden_size: int,
    intermediate_size: int,
) -> VisionSchedule:
    """The schedule for a vision pass over `patches` patches whose longest frame has
    `longest_frame` patches (the largest full-attention segment), in a tower `hidden_size` wide
    whose MLP is `intermediate_size` wide.

    Where attention is not fused, the pass runs in pieces within the budgets above: rows such
    that the MLP's temporaries fit in ROW_HIDDEN_STATES, query chunks whose scores fit in
    SCORE_HIDDEN_STATES. Both budgets grow with the pass, so a piece is a fixed share of it: 3 row
    pieces for MiMo-VL's widths, and full-attention chunks of 2 x head_dim queries.
    """
    if fused_attention(kind, dtype, head_dim, longest_frame):
        return VisionSchedule(one_graph=True)
    state = patches * hidden_size * dtype.size
    per_row = 3 * intermediate_size * dtype.size  # gate, up, their product
    pieces = -(-patches // max(1, ROW_HIDDEN_STATES * state // per_row))
    rows = -(-patches // pieces)
    return VisionSchedule(one_graph=False, rows=rows, score_budget=SCORE_HIDDEN_STATES * state)


@contextlib.contextmanager
def generation_settings(model: nn.Module) -> Iterator[mx.Stream | None]:
    """Apple silicon: pin the model's weights (wired limit) and generate on a dedicated stream,
    yielded to the caller. Elsewhere yields None (use the default stream) and changes nothing."""
    if device_kind() != "metal":
        yield None
        return
    stream = mx.new_stream(mx.default_device())
    limit = mx.device_info()["max_recommended_working_set_size"]
    weights = tree_reduce(
        lambda acc, x: acc + x.nbytes if isinstance(x, mx.array) else acc, model, 0
    )
    if weights > 0.9 * limit:
        warnings.warn(
            f"the model takes {weights / 2**30:.1f} GiB, close to the {limit / 2**30:.1f} GiB this "
            "Mac keeps wired for the GPU: generation may be slow; a smaller --max-pixels or a "
            "lower-bit conversion helps",
            stacklevel=3,
        )
    previous = mx.set_wired_limit(limit)
    try:
        yield stream
    finally:
        mx.synchronize(stream)
        mx.set_wired_limit(previous)


def release_cache(generated: int) -> None:
    """Apple silicon: every CACHE_RELEASE_INTERVAL tokens, give freed buffers back to the system."""
    if generated % CACHE_RELEASE_INTERVAL == 0 and device_kind() == "metal":
        mx.clear_cache()
