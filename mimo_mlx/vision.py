"""The vision tower: patch embedding, 2D rotary embedding, windowed/full attention blocks, 2x2 merger.

Attribute names equal the checkpoint's keys under `visual.`, so weights load by name.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import VisionConfig
from .windows import AttentionPlan, frame_lengths, plan_attention, rotary_positions, window_order

# Scores of one attention call are (segments, heads, queries, keys) floats; queries are split so that one
# chunk stays under this many bytes (a 1344x1344 image is one 9216-token frame in full attention, whose
# 16 heads of scores would take 5.4 GB at once).
SCORE_BUDGET_BYTES = 64 * 2**20
# Above this many patches each half-block is evaluated before the next is built: in one lazy graph MLX
# keeps the temporaries of consecutive layers alive together (0.4 GB more at 1344x1344). Smaller
# images (the default limit is 4096 patches) stay one graph.
EAGER_PATCHES = 4096


def rotate_half(x: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    return mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)


@mx.compile
def apply_rotary(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate in float32, as the reference does, and return in x's dtype (fused: one pass)."""
    xf = x.astype(mx.float32)
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


def segment_attention(
    q: mx.array, k: mx.array, v: mx.array, plan: AttentionPlan, scale: float
) -> mx.array:
    """Attention restricted to the plan's segments. q, k, v: (H, N, D) -> (N, H*D).

    Heads go in the batch axis and segments in the head axis of one attention call, so a group of
    contiguous equal segments is a free reshape of (H, N, D).
    """
    heads, n, dim = q.shape
    outputs = []
    for group in plan.groups:
        if group.index is None:
            qg, kg, vg = (x.reshape(heads, group.count, group.size, dim) for x in (q, k, v))
        else:
            index = mx.array(group.index)
            qg, kg, vg = q[:, index], k[:, index], v[:, index]  # (H, segments, size, D)
        mask = None if group.key_mask is None else mx.array(group.key_mask)[None, :, None, :]
        out = _chunked_sdpa(qg, kg, vg, scale, mask)  # (H, segments, size, D)
        outputs.append(out.reshape(heads, -1, dim))
    out = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=1)
    if plan.restore is not None:
        out = out[:, mx.array(plan.restore)]
    return out.transpose(1, 0, 2).reshape(n, heads * dim)


def _chunked_sdpa(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None):
    heads, segments, size, _ = q.shape
    chunk = max(1, SCORE_BUDGET_BYTES // (4 * segments * heads * k.shape[2]))
    if chunk >= size:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    parts = []
    for i in range(0, size, chunk):
        part = mx.fast.scaled_dot_product_attention(
            q[:, :, i : i + chunk], k, v, scale=scale, mask=mask
        )
        # Evaluated one by one: in a single lazy graph MLX schedules every chunk's scores at once.
        mx.eval(part)
        parts.append(part)
    return mx.concatenate(parts, axis=2)


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

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, plan: AttentionPlan) -> mx.array:
        n = x.shape[0]
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, -1).transpose(1, 2, 0, 3)  # (3, H, N, D)
        q, k = apply_rotary(qkv[:2], cos, sin)  # q and k in one pass
        return self.proj(segment_attention(q, k, qkv[2], plan, self.scale))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm2 = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def __call__(
        self, x: mx.array, cos: mx.array, sin: mx.array, plan: AttentionPlan, eager: bool = False
    ) -> mx.array:
        x = x + self.attn(self.norm1(x), cos, sin, plan)
        if eager:
            mx.eval(x)
        x = x + self.mlp(self.norm2(x))
        if eager:
            mx.eval(x)
        return x


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
        """(patches, 1176) pixels of all images/frames in `grid_thw` order -> (patches / 4, out_hidden)."""
        cfg = self.config
        grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
        order, window_lengths = window_order(grid_thw, cfg.spatial_merge_size, cfg.window_side)
        unit = cfg.merge_unit
        window_plan = plan_attention(window_lengths * unit, pad_to_longest=True)
        frame_plan = plan_attention(frame_lengths(grid_thw), pad_to_longest=False)
        cos, sin = self._rotary(rotary_positions(grid_thw, cfg.spatial_merge_size), order)

        x = self.patch_embed(pixel_values.astype(self.patch_embed.proj.weight.dtype))  # (N, C)
        n, width = x.shape
        order_mx = mx.array(order)
        x = x.reshape(n // unit, unit, width)[order_mx].reshape(n, width)  # window order
        eager = n > EAGER_PATCHES
        for i, block in enumerate(self.blocks):
            plan = frame_plan if i in cfg.fullatt_block_indexes else window_plan
            x = block(x, cos, sin, plan, eager)
        merged = self.merger(x)  # (N / 4, out_hidden), still in window order
        return merged[mx.array(np.argsort(order))]

    def _rotary(self, positions: np.ndarray, order: np.ndarray) -> tuple[mx.array, mx.array]:
        """cos/sin (N, head_dim) in float32, rows permuted to window order like the activations."""
        unit = self.config.merge_unit
        positions = positions.reshape(-1, unit, 2)[order].reshape(-1, 2)
        freqs = mx.array(positions, dtype=mx.float32)[..., None] * mx.array(self._inv_freq)
        freqs = freqs.reshape(positions.shape[0], -1)  # (N, D/2): rows' angles, then columns'
        angles = mx.concatenate([freqs, freqs], axis=-1)
        return mx.cos(angles), mx.sin(angles)
