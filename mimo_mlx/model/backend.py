"""What one backend needs, decided outside the layers: how long passes are evaluated, the rotary
kernel and generation settings.

The layers build lazy graphs and never evaluate. Backends differ in ways that matter:

- What an evaluated graph holds. The CPU frees an intermediate as soon as its last user has run.
  A GPU backend (Metal, CUDA) encodes the graph ahead of the device in command buffers (CUDA
  graphs) and keeps every input of a buffer's commands until the buffer has run; up to ten buffers
  are in flight. MLX's CUDA backend fills a buffer with up to 100 commands on an H100 or H200
  (Metal: 20 to 50, by chip), so one lazy vision pass held 12.4 GB over its weights at 1344x1344
  on an H200: several blocks' intermediates in each of several buffers. There long passes are
  evaluated as they go (`vision_schedule`, `prefill_schedule`): a stretch of the pass at a time,
  each within a budget where a step of a block (a layer) allows.
- Attention. Metal and CUDA (cuDNN, half precision) run `mx.fast.scaled_dot_product_attention` as a
  fused kernel that never holds the (queries x keys) score matrix. The CPU, and float32 on CUDA,
  build the full scores; one 1344x1344 image in full attention would take 5.4 GB of them. There the
  vision tower runs every half-block in evaluated pieces that each stay within a small budget.
- Setting up attention. CUDA runs a fused attention over more than one query through cuDNN,
  which builds a graph for each new shape of queries and keys: 44-70 ms for a pass over 4 to 16
  tokens at a cache length not seen before on the H200, 1.7 ms at one already seen. Every
  prompt-lookup verification continues the cache at a new length, so there a few queries go
  through plain matmuls instead (`plain_attention`).
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
# What an evaluated stretch of a pass holds on a GPU backend, every intermediate alive until it has
# run, per token:
# - a vision block: BLOCK_HELD_HIDDEN hidden-wide tensors and BLOCK_HELD_INTERMEDIATE MLP-wide ones
#   (gate, up, their product). Measured on an H200: one full-attention block of MiMo-VL's tower
#   alone, over an evaluated input, held 0.646 GB at 1344x1344 and 0.384 GB at 1024x1024: 19.3
#   hidden states beside the MLP's 3 at both sizes (windowed blocks hold a little more where
#   windows are padded: 0.476 GB at 1024x1024).
# - a decoder layer: HELD_HIDDEN and HELD_INTERMEDIATE, an upper estimate (a 4,096-token prefill
#   evaluated every layer held 0.27 GB over its weights and cache on the H200, against the
#   estimate's 0.76 GB).
BLOCK_HELD_HIDDEN = 19
BLOCK_HELD_INTERMEDIATE = 3
HELD_HIDDEN = 10
HELD_INTERMEDIATE = 3
# A vision block runs as the three steps its call composes (`VisionBlock.project`: norm, queries,
# keys, values, rotary embedding; `attend`: attention, projection, residual; `feed_forward`), a
# third of the block's hold each, taken as even.
BLOCK_STEPS = 3
# On a GPU backend the vision pass runs in overlapped stretches of steps, each within this budget
# (at least one step): one stretch runs while the next is queued, and the one before may not have
# returned its buffers yet, so about three stretches' worth is alive at once, at most one block
# where a step is larger than the budget. Larger stretches where steps are small: each stretch is
# a host sync, and at 448x448 on the H200 stretches of two blocks (this budget's seven steps)
# took 16.2 ms against 15.3 for one graph, of one block 17.3.
STRETCH_BUDGET = 160 * 2**20
# A GPU prefill is evaluated after as many decoder layers as hold this much together, at least
# one (each evaluation a host sync: about 0.1 ms when it drains the H200). Also the budget of a
# group of frames where the tower runs in evaluated pieces.
PASS_BUDGET = 256 * 2**20
# Where the tower runs in evaluated pieces, budgets in hidden states of the pass (patches x width).
# A query chunk's attention scores stay within SCORE_HIDDEN_STATES. A piece of per-token work (the
# MLP's gate, up and their product for `rows` tokens) stays within ROW_HIDDEN_STATES: the queries,
# keys and values the attention half holds for every token anyway, so it adds nothing to a
# block's peak. Measured on the CPU at small scale, above the pixels: a 448x448 image holds 22 MB
# instead of 105 MB as one lazy graph, 1344x1344 198 MB instead of 713 MB; 5, 3 or 2 row pieces
# peak the same, and fewer split the matmuls less (448x448: 0.96, 0.91, 0.89 s). The pieces hold
# about PIECES_HELD_HIDDEN hidden states at once (tests/test_vision_windows.py checks it).
SCORE_HIDDEN_STATES = 2
ROW_HIDDEN_STATES = 3
PIECES_HELD_HIDDEN = 10
# On CUDA, attention over 2 to this many queries runs as plain matmuls, not cuDNN (see
# `plain_attention`): prompt lookup verifies up to 16 tokens a pass.
PLAIN_ATTENTION_QUERIES = 16
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


def plain_attention(kind: str, dtype: mx.Dtype, head_dim: int, queries: int) -> bool:
    """Whether attention over `queries` queries should run as plain matmuls rather than MLX's
    fused kernel: on CUDA, for 2 to PLAIN_ATTENTION_QUERIES queries where MLX would pick cuDNN,
    which builds a graph for every new shape (tens of ms: far more than a few queries' scores
    cost to compute). One query runs MLX's vector kernel, which has no such cost; so does
    everything on Metal."""
    if kind != "cuda" or not 1 < queries <= PLAIN_ATTENTION_QUERIES:
        return False
    return fused_attention(kind, dtype, head_dim, queries)


def held_bytes(tokens: int, hidden_size: int, intermediate_size: int, itemsize: int) -> int:
    """What one decoder layer over `tokens` tokens may hold on a GPU backend when its
    intermediates all live until the end of the evaluation (see HELD_HIDDEN)."""
    return tokens * (HELD_HIDDEN * hidden_size + HELD_INTERMEDIATE * intermediate_size) * itemsize


def block_bytes(tokens: int, hidden_size: int, intermediate_size: int, itemsize: int) -> int:
    """What one vision block over `tokens` patches holds on a GPU backend when its intermediates
    all live until it has run (see BLOCK_HELD_HIDDEN)."""
    per_token = BLOCK_HELD_HIDDEN * hidden_size + BLOCK_HELD_INTERMEDIATE * intermediate_size
    return tokens * per_token * itemsize


@dataclass(frozen=True)
class VisionSchedule:
    """How a vision pass is evaluated (`vision.encode`); the default is one lazy graph.

    group_patches: the frames run in consecutive groups of whole frames, at most this many patches
    each (a larger frame alone), each group a pass of its own whose features are evaluated before
    the next starts. Attention never crosses frames, so the features are the same. 0: one group.
    steps_per_eval: the blocks run as their three steps (`VisionBlock.project`, `attend`,
    `feed_forward`), and what the next step needs is evaluated after every this many steps (0:
    never inside a group).
    overlapped: each such stretch is queued (`mx.async_eval`) and the host then waits only for
    the stretch before it, so the device runs one stretch while the host builds the next: two
    in flight at most. Otherwise each is evaluated before the next is built.
    rows: where attention is not fused, every half-block runs in pieces instead, each evaluated
    before the next is built: the per-token work (norms, projections, rotary embedding, MLP)
    `rows` tokens at a time, attention in query chunks whose scores stay under `score_budget`
    bytes.
    """

    group_patches: int = 0
    steps_per_eval: int = 0
    overlapped: bool = False
    rows: int = 0
    score_budget: int = 0

    @property
    def one_graph(self) -> bool:
        return self == VisionSchedule()

    def query_chunk(self, heads: int, segments: int, size: int, itemsize: int) -> int | None:
        """Queries per evaluated piece of an attention group of `segments` self-attention
        segments of `size` tokens each; None when the whole group is one piece."""
        if not self.score_budget:
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
    budget: int | None = None,
) -> VisionSchedule:
    """The schedule for a vision pass on backend `kind` over `patches` patches whose longest frame
    has `longest_frame` patches (the largest full-attention segment), in a tower `hidden_size`
    wide whose MLP is `intermediate_size` wide.

    Where attention is fused (Metal; CUDA in half precision), frames are grouped so that a step of
    a block over a group holds at most `budget` (default STRETCH_BUDGET; `block_bytes` /
    BLOCK_STEPS; a frame larger than that is a group of its own), and each group runs in
    overlapped stretches of as many steps as fit in `budget`, at least one. About three
    stretches are alive at once: max(3 x budget, one block of the largest frame) above the
    pixels and features. For MiMo-VL's tower in bfloat16: stretches of one step at 1024x1024
    and 1344x1344 (a block holds 0.38 and 0.65 GB), of 7 (two blocks and a third) at 448x448,
    and groups of 7 frames of a video at the default 1024 patches a frame.

    Elsewhere a group runs every half-block in pieces (see `VisionSchedule`) within `budget`
    (default PASS_BUDGET): rows such that the MLP's temporaries fit in ROW_HIDDEN_STATES, query
    chunks whose scores fit in SCORE_HIDDEN_STATES; 3 row pieces for MiMo-VL's widths,
    full-attention chunks of 2 x head_dim queries.
    """
    size = dtype.size
    if fused_attention(kind, dtype, head_dim, longest_frame):
        budget = budget or STRETCH_BUDGET
        per_step = block_bytes(1, hidden_size, intermediate_size, size) // BLOCK_STEPS
        group = min(patches, max(longest_frame, budget // per_step))
        steps = max(1, budget // (group * per_step))
        return VisionSchedule(group_patches=group, steps_per_eval=steps, overlapped=True)
    budget = budget or PASS_BUDGET
    group = min(patches, max(longest_frame, budget // (PIECES_HELD_HIDDEN * hidden_size * size)))
    state = group * hidden_size * size
    per_row = 3 * intermediate_size * size  # gate, up, their product
    pieces = -(-group // max(1, ROW_HIDDEN_STATES * state // per_row))
    rows = -(-group // pieces)
    return VisionSchedule(group_patches=group, rows=rows, score_budget=SCORE_HIDDEN_STATES * state)


def prefill_schedule(
    kind: str,
    dtype: mx.Dtype,
    tokens: int,
    hidden_size: int,
    intermediate_size: int,
    budget: int = PASS_BUDGET,
) -> int:
    """Decoder layers per evaluation in a prefill pass of `tokens` tokens, for the model's call
    (`layers_per_eval`); 0: the pass is one lazy graph.

    The CPU frees as it goes: 0. On Metal and CUDA, as many layers as fit in `budget` together
    (`held_bytes` each), at least one. A prefill pass of T tokens then holds, above the weights,
    the KV cache and the prompt's vision features, about
    max(budget, T x (HELD_HIDDEN x hidden + HELD_INTERMEDIATE x intermediate) x itemsize), whatever
    the number of layers (fused attention assumed, as MiMo-VL's head dim 128 gets in half
    precision; unfused attention also holds each layer's scores). For MiMo-VL in bfloat16 and
    512-token chunks: 75.8 MB a layer, evaluated every 3 layers, about 0.23 GB.
    """
    if kind == "cpu":
        return 0
    return max(1, budget // held_bytes(tokens, hidden_size, intermediate_size, dtype.size))


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
