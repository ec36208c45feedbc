"""The vision tower: patch embedding, 2D rotary embedding, windowed/full attention blocks, 2x2 merger.

Attribute names equal the checkpoint's keys under `visual.`, so weights load by name. The modules
build one lazy graph and never evaluate; `encode` runs the same math under a backend's memory
schedule (`tower_schedule`): groups of frames, each in overlapped stretches of a block's steps
where attention is fused, in evaluated pieces where the backend would otherwise hold every attention
score.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .activations import swiglu
from .backend import BLOCK_STEPS, VisionSchedule, vision_schedule
from .config import VisionConfig
from .windows import (
    AttentionGroup,
    AttentionPlan,
    frame_groups,
    frame_lengths,
    plan_attention,
    rotary_positions,
    window_order,
)


def rotate_half(x: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    return mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)


@mx.compile
def apply_rotary(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate in float32, as the reference does, and return in x's dtype (fused: one pass)."""
    xf = x.astype(mx.float32)
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


def group_attention(
    q: mx.array, k: mx.array, v: mx.array, group: AttentionGroup, scale: float, chunk: int | None
) -> Iterator[mx.array]:
    """Attention within one group's segments, `chunk` queries at a time (None: all at once).

    q, k, v: (H, N, D). Heads go in the batch axis and segments in the head axis of one attention
    call, so a group of contiguous equal segments is a free reshape. Yields (H, segments, piece, D).
    """
    heads, _, dim = q.shape
    if group.index is None:
        qg, kg, vg = (x.reshape(heads, group.count, group.size, dim) for x in (q, k, v))
    else:
        index = mx.array(group.index)
        qg, kg, vg = q[:, index], k[:, index], v[:, index]  # (H, segments, size, D)
    mask = None if group.key_mask is None else mx.array(group.key_mask)[None, :, None, :]
    step = chunk or group.size
    for i in range(0, group.size, step):
        yield mx.fast.scaled_dot_product_attention(
            qg[:, :, i : i + step], kg, vg, scale=scale, mask=mask
        )


def assemble(pieces: list[list[mx.array]], plan: AttentionPlan) -> mx.array:
    """Each group's pieces (H, segments, piece, D), in order -> (N, H*D) in token order."""
    groups = [mx.concatenate(p, axis=2) if len(p) > 1 else p[0] for p in pieces]
    heads, dim = groups[0].shape[0], groups[0].shape[-1]
    out = mx.concatenate([g.reshape(heads, -1, dim) for g in groups], axis=1)  # (H, N, D)
    if plan.restore is not None:
        out = out[:, mx.array(plan.restore)]
    return out.transpose(1, 0, 2).reshape(out.shape[1], heads * dim)


def segment_attention(
    q: mx.array, k: mx.array, v: mx.array, plan: AttentionPlan, scale: float
) -> mx.array:
    """Attention restricted to the plan's segments, one lazy graph. (H, N, D) each -> (N, H*D)."""
    return assemble([list(group_attention(q, k, v, g, scale, None)) for g in plan.groups], plan)


@dataclass(frozen=True)
class Layout:
    """Host bookkeeping of one vision pass, computed once from the grids."""

    order: np.ndarray  # merged tokens in window order (index into arrival order)
    window_plan: AttentionPlan  # attention within windows
    frame_plan: AttentionPlan  # attention within frames (the full-attention blocks)
    cos: mx.array  # (N, head_dim) rotary tables in window order, float32
    sin: mx.array
    patches: int
    longest_frame: int


class PatchEmbed(nn.Module):
    """The (2, 14, 14) Conv3d with stride = kernel is one matmul over each flattened 1176-vector."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.proj = nn.Linear(config.patch_dim, config.hidden_size, bias=False)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        return self.proj(pixel_values)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.scale = config.head_dim**-0.5
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def heads(self, x: mx.array, cos: mx.array, sin: mx.array) -> tuple[mx.array, ...]:
        """Rotated queries and keys, and values: (H, N, D) each."""
        n = x.shape[0]
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, -1).transpose(1, 2, 0, 3)  # (3, H, N, D)
        q, k = apply_rotary(qkv[:2], cos, sin)  # q and k in one pass
        return q, k, qkv[2]

    def output(self, heads: tuple[mx.array, ...], plan: AttentionPlan) -> mx.array:
        """Attention of the queries over the keys and values within the plan's segments, then
        the output projection: (N, C)."""
        return self.proj(segment_attention(*heads, plan, self.scale))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm2 = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, plan: AttentionPlan) -> mx.array:
        return self.feed_forward(self.attend(x, self.project(x, cos, sin), plan))

    def project(self, x: mx.array, cos: mx.array, sin: mx.array) -> tuple[mx.array, ...]:
        """The first residual line's queries, keys and values: of norm1(x), rotated."""
        return self.attn.heads(self.norm1(x), cos, sin)

    def attend(self, x: mx.array, heads: tuple[mx.array, ...], plan: AttentionPlan) -> mx.array:
        """The block's first residual line, from `project`'s heads: x + attention(norm1(x))."""
        return x + self.attn.output(heads, plan)

    def feed_forward(self, x: mx.array) -> mx.array:
        """The block's second residual line, token by token: x + mlp(norm2(x))."""
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm, then each 2x2 block of patches (adjacent rows) concatenated and sent through an MLP."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        width = config.hidden_size * config.merge_unit
        self.width = width
        self.ln_q = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = [nn.Linear(width, width), nn.GELU(), nn.Linear(width, config.out_hidden_size)]

    def __call__(self, x: mx.array) -> mx.array:
        x = self.ln_q(x).reshape(-1, self.width)  # (N / 4, 4 * C)
        for layer in self.mlp:
            x = layer(x)
        return x


class VisionModel(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = [VisionBlock(config) for _ in range(config.depth)]
        self.merger = PatchMerger(config)
        dim = config.head_dim // 2
        self._inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))

    def __call__(self, pixel_values: mx.array, grid_thw: np.ndarray) -> mx.array:
        """(patches, 1176) pixels of all images/frames in `grid_thw` order -> (patches / 4, out_hidden).

        One lazy graph; `encode` runs the same pass under a backend's memory schedule.
        """
        layout = self.layout(grid_thw)
        x = self.embed(pixel_values, layout)
        for i, block in enumerate(self.blocks):
            x = block(x, layout.cos, layout.sin, self.plan(i, layout))
        return self.merge(x, layout)

    def layout(self, grid_thw: np.ndarray) -> Layout:
        cfg = self.config
        grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
        order, window_lengths = window_order(grid_thw, cfg.spatial_merge_size, cfg.window_side)
        frames = frame_lengths(grid_thw)
        cos, sin = self._rotary(rotary_positions(grid_thw, cfg.spatial_merge_size), order)
        return Layout(
            order=order,
            window_plan=plan_attention(window_lengths * cfg.merge_unit, pad_to_longest=True),
            frame_plan=plan_attention(frames, pad_to_longest=False),
            cos=cos,
            sin=sin,
            patches=int(frames.sum()),
            longest_frame=int(frames.max()),
        )

    def plan(self, block: int, layout: Layout) -> AttentionPlan:
        full = block in self.config.fullatt_block_indexes
        return layout.frame_plan if full else layout.window_plan

    def embed(self, pixel_values: mx.array, layout: Layout) -> mx.array:
        """Patch embedding, rows reordered window by window: (N, C)."""
        x = self.patch_embed(pixel_values.astype(self.patch_embed.proj.weight.dtype))
        n, width = x.shape
        unit = self.config.merge_unit
        return x.reshape(n // unit, unit, width)[mx.array(layout.order)].reshape(n, width)

    def merge(self, x: mx.array, layout: Layout) -> mx.array:
        """Merger, then merged tokens back in arrival order: (N / 4, out_hidden)."""
        return self.merger(x)[mx.array(np.argsort(layout.order))]

    def _rotary(self, positions: np.ndarray, order: np.ndarray) -> tuple[mx.array, mx.array]:
        """cos/sin (N, head_dim) in float32, rows permuted to window order like the activations."""
        unit = self.config.merge_unit
        positions = positions.reshape(-1, unit, 2)[order].reshape(-1, 2)
        freqs = mx.array(positions, dtype=mx.float32)[..., None] * mx.array(self._inv_freq)
        freqs = freqs.reshape(positions.shape[0], -1)  # (N, D/2): rows' angles, then columns'
        angles = mx.concatenate([freqs, freqs], axis=-1)
        return mx.cos(angles), mx.sin(angles)


def tower_schedule(
    tower: VisionModel, grid_thw: np.ndarray, kind: str, budget: int | None = None
) -> VisionSchedule:
    """How backend `kind` runs a pass of `tower` over `grid_thw`: `backend.vision_schedule` for
    the pass's sizes and the tower's widths and dtype, within `budget` bytes (its default)."""
    cfg = tower.config
    frames = frame_lengths(np.asarray(grid_thw).reshape(-1, 3))
    return vision_schedule(
        kind,
        tower.patch_embed.proj.weight.dtype,
        cfg.head_dim,
        patches=int(frames.sum()),
        longest_frame=int(frames.max()),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        budget=budget,
    )


def encode(
    tower: VisionModel, pixel_values: mx.array, grid_thw: np.ndarray, schedule: VisionSchedule
) -> mx.array:
    """The tower's pass under `schedule`: one lazy graph, or evaluated as it goes (then the
    features come back evaluated, so the pass's last stretch is not left to the next graph).

    Frames run in groups (`VisionSchedule.group_patches`), each group's patches a run of rows.
    Within a group the blocks run as the three steps their call composes (`VisionBlock.project`,
    `attend`, `feed_forward`), evaluated every `steps_per_eval` steps, overlapped or not; or
    every half-block in pieces, which repeats the block's two residual lines piece by piece (rows
    of tokens for the per-token work, query chunks for attention); the math is the same.
    """
    if schedule.one_graph:
        return tower(pixel_values, grid_thw)
    grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    patches, unit = int(np.prod(grid_thw, axis=1).sum()), tower.config.merge_unit
    features, start = None, 0
    for grid in frame_groups(grid_thw, schedule.group_patches or patches):
        end = start + int(np.prod(grid, axis=1).sum())
        group = _encode_group(tower, pixel_values[start:end], grid, schedule)
        if end - start == patches:  # one group
            features = group
        else:  # each group's rows written in place: no second copy of the features
            if features is None:
                features = mx.zeros((patches // unit, group.shape[1]), group.dtype)
            features[start // unit : end // unit] = group
        mx.eval(features)
        start = end
    return features


def _encode_group(tower: VisionModel, pixel_values, grid_thw, schedule: VisionSchedule):
    """One group's pass under `schedule` (not one lazy graph): its merged features, lazy."""
    layout = tower.layout(grid_thw)
    x = tower.embed(pixel_values, layout)
    if schedule.rows:
        mx.eval(x)
        for i, block in enumerate(tower.blocks):
            x = _attention_half(x, block, layout, tower.plan(i, layout), schedule)
            x = _mlp_half(x, block, schedule.rows)
        return tower.merge(x, layout)
    every, steps = schedule.steps_per_eval, BLOCK_STEPS * len(tower.blocks)
    heads, in_flight = (), ()  # the stretch queued before the last one (overlapped)
    for step in range(steps):
        index, part = divmod(step, BLOCK_STEPS)
        block = tower.blocks[index]
        if part == 0:
            heads = block.project(x, layout.cos, layout.sin)
        elif part == 1:
            x, heads = block.attend(x, heads, tower.plan(index, layout)), ()
        else:
            x = block.feed_forward(x)
        if not every or (step + 1) % every or step == steps - 1:
            continue  # the merger rides with the last stretch
        if schedule.overlapped:
            mx.async_eval(x, *heads)
            if in_flight:
                mx.eval(*in_flight)  # waits for it: two stretches in flight at most
            in_flight = (x, *heads)
        else:
            mx.eval(x, *heads)
    return tower.merge(x, layout)


def _attention_half(x, block: VisionBlock, layout: Layout, plan: AttentionPlan, schedule):
    """x + attention(norm1(x)), evaluated; its queries, keys and values die on return."""

    def heads(r: slice) -> tuple[mx.array, ...]:
        return block.attn.heads(block.norm1(x[r]), layout.cos[r], layout.sin[r])

    q, k, v = _in_rows(heads, x.shape[0], schedule.rows, axis=1)
    attended = _evaluated_attention(q, k, v, plan, block, schedule)
    return _in_rows(lambda r: x[r] + block.attn.proj(attended[r]), x.shape[0], schedule.rows)


def _mlp_half(x, block: VisionBlock, rows: int) -> mx.array:
    """x + mlp(norm2(x)), evaluated."""
    return _in_rows(lambda r: block.feed_forward(x[r]), x.shape[0], rows)


def _in_rows(piece, n: int, rows: int, axis: int = 0):
    """`piece(slice)` over `n` token rows, `rows` at a time, each piece evaluated before the next
    is built; the pieces (an array or a tuple of arrays, tokens along `axis`) joined, evaluated."""
    pieces = []
    for start in range(0, n, rows):
        pieces.append(piece(slice(start, start + rows)))
        mx.eval(pieces[-1])
    if len(pieces) == 1:
        return pieces[0]
    if isinstance(pieces[0], tuple):
        joined = tuple(mx.concatenate(parts, axis=axis) for parts in zip(*pieces, strict=True))
    else:
        joined = mx.concatenate(pieces, axis=axis)
    mx.eval(joined)
    return joined


def _evaluated_attention(q, k, v, plan: AttentionPlan, block: VisionBlock, schedule) -> mx.array:
    heads, itemsize = q.shape[0], q.dtype.size
    pieces = []
    for group in plan.groups:
        chunk = schedule.query_chunk(heads, group.count, group.size, itemsize)
        group_pieces = []
        for piece in group_attention(q, k, v, group, block.attn.scale, chunk):
            if chunk is not None:  # in one lazy graph MLX would schedule every chunk's scores
                mx.eval(piece)
            group_pieces.append(piece)
        pieces.append(group_pieces)
    return assemble(pieces, plan)
