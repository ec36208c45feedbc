"""The decoder: Qwen2-style layers with grouped-query attention and multimodal rotary embedding.

Attribute names equal the checkpoint's keys under `model.`, so weights load by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .activations import swiglu
from .backend import device_kind, plain_attention, rope_kernel
from .cache import LayerCache, QuantizedArray
from .config import TextConfig
from .vision import rotate_half

Rotation = Callable[[mx.array], mx.array]


class MRoPE:
    """Rotations for (3, B, L) positions: frequency i takes its angle from axis section_of(i) % 3."""

    def __init__(self, config: TextConfig):
        dim = config.head_dim
        self.dim, self.theta = dim, config.rope_theta
        self.inv_freq = mx.array(
            1.0 / (self.theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
        )
        axes = np.concatenate([np.full(n, i % 3) for i, n in enumerate(config.mrope_section)])
        self.axis_of_freq = mx.array(axes)  # (D/2,)

    def __call__(
        self, positions: mx.array | int, dtype: mx.Dtype, length: int, kernel: bool
    ) -> Rotation:
        """positions (3, B, L), or the start of text-only runs of `length` tokens: (B,) per row or
        one int for all -> a function rotating (B, H, L', D): the last L' <= L of those tokens.

        Text positions are equal on all three axes, so M-RoPE is plain RoPE there: with `kernel`
        (a backend with a rope kernel, see `backend.rope_kernel`) each rotation is one fused
        call; otherwise the angles are computed once here and shared by every layer.
        """
        if isinstance(positions, int) or positions.ndim == 1:
            if kernel:

                def rotate_kernel(x: mx.array) -> mx.array:
                    skip = length - x.shape[2]  # rows before x's (0 unless only the last are kept)
                    offset = positions + skip if skip else positions
                    return mx.fast.rope(
                        x, self.dim, traditional=False, base=self.theta, scale=1.0, offset=offset
                    )

                return rotate_kernel
            starts = mx.array([positions]) if isinstance(positions, int) else positions
            text = starts[:, None].astype(mx.float32) + mx.arange(length, dtype=mx.float32)
            freqs = text[..., None] * self.inv_freq  # (B, L, D/2)
        else:
            per_freq = positions[self.axis_of_freq]  # (D/2, B, L)
            freqs = per_freq.transpose(1, 2, 0).astype(mx.float32) * self.inv_freq  # (B, L, D/2)
        angles = mx.concatenate([freqs, freqs], axis=-1)[:, None]  # (B, 1, L, D), float32
        cos, sin = mx.cos(angles).astype(dtype), mx.sin(angles).astype(dtype)

        def rotate(x: mx.array) -> mx.array:
            if x.shape[2] < length:
                last = slice(length - x.shape[2], None)
                return x * cos[:, :, last] + rotate_half(x) * sin[:, :, last]
            return x * cos + rotate_half(x) * sin

        return rotate


def attention(
    queries: mx.array,
    keys: mx.array | QuantizedArray,
    values: mx.array | QuantizedArray,
    scale: float,
    mask: str | mx.array | None,
) -> mx.array:
    """softmax(queries keys^T * scale, masked) values: (B, H, L, D) queries over (B, H_kv, N, D)
    keys and values (grouped-query heads), in the model's dtype or as a quantized cache returns
    them.

    Quantized keys and values are read by MLX's quantized matmuls, never dequantized whole, when
    the scores are no larger than they would be dequantized (decode steps, prompt-lookup drafts).
    A prefill chunk of many queries dequantizes them for the fused attention instead: its scores
    would be far larger (a GPU's fused kernel never holds them), and the result is the same. On
    CUDA a few queries (a prompt-lookup verification) run as plain matmuls, where the fused
    kernel would first build a graph for the new cache length (`backend.plain_attention`).
    """
    heads, length, head_dim = queries.shape[1:]
    if isinstance(keys, QuantizedArray):
        kv_heads = keys.packed.shape[1]
        if heads * length <= 2 * kv_heads * head_dim:
            return quantized_attention(queries, keys, values, scale, mask)
        keys, values = keys.dequantize(), values.dequantize()
    if length > 1 and plain_attention(device_kind(), queries.dtype, head_dim, length):
        return plain_grouped_attention(queries, keys, values, scale, mask)
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)


def quantized_attention(
    queries: mx.array,
    keys: QuantizedArray,
    values: QuantizedArray,
    scale: float,
    mask: str | mx.array | None,
) -> mx.array:
    """`attention` with quantized keys and values, through `mx.quantized_matmul` (as mlx-lm's
    `quantized_scaled_dot_product_attention`). mask: None, "causal" (aligned to the end of the
    keys, as MLX's fused attention aligns it), or a boolean or additive array that broadcasts
    to (L, N) or, as the fused attention takes it, to (B, H, L, N)."""
    k = [part[:, :, None] for part in keys.parts]  # (B, Hkv, 1, N, .)
    v = [part[:, :, None] for part in values.parts]
    quant = dict(group_size=keys.group_size, bits=keys.bits)
    return _grouped(
        queries,
        keys.packed.shape[1],
        scale,
        mask,
        lambda q: mx.quantized_matmul(q, *k, transpose=True, **quant),
        lambda weights: mx.quantized_matmul(weights, *v, transpose=False, **quant),
    )


def plain_grouped_attention(
    queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask: str | mx.array | None
) -> mx.array:
    """`attention` through plain matmuls (as MLX's own unfused path), for a few queries where
    the fused kernel costs more to set up than to run (`backend.plain_attention`); the masks of
    `quantized_attention`."""
    k, v = keys[:, :, None], values[:, :, None]  # (B, Hkv, 1, N, D)
    return _grouped(
        queries,
        keys.shape[1],
        scale,
        mask,
        lambda q: q @ k.swapaxes(-1, -2),
        lambda weights: weights @ v,
    )


def _grouped(
    queries: mx.array,
    kv_heads: int,
    scale: float,
    mask: str | mx.array | None,
    scores_of: Callable[[mx.array], mx.array],
    weighted: Callable[[mx.array], mx.array],
) -> mx.array:
    """softmax(scores_of(scaled queries), masked) through `weighted`, the query heads grouped
    over their key/value head: (B, Hkv, G, L, D) queries give (B, Hkv, G, L, N) scores."""
    batch, heads, length, head_dim = queries.shape
    groups = heads // kv_heads
    q = (queries * scale).reshape(batch, kv_heads, groups, length, head_dim)  # (B, Hkv, G, L, D)
    scores = scores_of(q)  # (B, Hkv, G, L, N)
    if isinstance(mask, str):  # "causal"
        count = scores.shape[-1]
        mask = mx.arange(count - length, count)[:, None] >= mx.arange(count)[None]  # (L, N)
    if mask is not None and mask.ndim == 4:  # (B, H or 1, L, N); the scores split the heads
        heads_axis = (kv_heads, groups) if mask.shape[1] > 1 else (1, 1)
        mask = mask.reshape(mask.shape[0], *heads_axis, *mask.shape[2:])
    if mask is not None and mask.dtype == mx.bool_:
        scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
    elif mask is not None:
        scores = scores + mask
    weights = mx.softmax(scores, axis=-1, precise=True)
    return weighted(weights).reshape(batch, heads, length, head_dim)  # from (B, Hkv, G, L, D)


@dataclass(frozen=True)
class Segment:
    """One input of a decoder pass that runs several (`DecoderLayer.segments`): its rotation,
    attention mask and layer cache, and how many of its last tokens to compute past the keys
    and values (0: all)."""

    rotate: Rotation
    mask: str | mx.array | None
    cache: LayerCache | None
    keep: int = 0


def rows_through(layer: Callable[[mx.array], mx.array], xs: list[mx.array]) -> list[mx.array]:
    """`layer` (row-wise: a projection, the MLP) over every row of `xs` (each (B, L, C)) in one
    call, split back. One input goes through as it is."""
    if len(xs) == 1:
        return [layer(xs[0])]
    rows = [x.reshape(-1, x.shape[-1]) for x in xs]
    out = layer(mx.concatenate(rows))
    ends = np.cumsum([r.shape[0] for r in rows])[:-1].tolist()
    return [o.reshape(*x.shape[:2], -1) for o, x in zip(mx.split(out, ends), xs, strict=True)]


class Attention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scale = config.head_dim**-0.5
        dim, kv_dim = config.hidden_size, config.num_key_value_heads * config.head_dim
        self.q_proj = nn.Linear(dim, dim, bias=True)
        self.k_proj = nn.Linear(dim, kv_dim, bias=True)
        self.v_proj = nn.Linear(dim, kv_dim, bias=True)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def __call__(self, x, rotate: Rotation, mask, cache: LayerCache | None, keep: int = 0):
        """Keys and values of every token of x; queries and outputs for the last `keep` (0: all)."""
        return self.segments([x], [Segment(rotate, mask, cache, keep)])[0]

    def segments(self, xs: list[mx.array], parts: list[Segment]) -> list[mx.array]:
        """`__call__` for several inputs at once, each with its own positions, mask and cache
        (a batch's decode rows and a prompt's chunk): the projections are one matmul over all
        their rows, the attention runs apart."""
        queries = [
            x[:, -part.keep :] if part.keep else x for x, part in zip(xs, parts, strict=True)
        ]
        qs = rows_through(self.q_proj, queries)
        ks, vs = rows_through(self.k_proj, xs), rows_through(self.v_proj, xs)
        outs = []
        for q, k, v, part in zip(qs, ks, vs, parts, strict=True):
            q = q.reshape(*q.shape[:2], self.num_heads, -1).transpose(0, 2, 1, 3)
            k = k.reshape(*k.shape[:2], self.num_kv_heads, -1).transpose(0, 2, 1, 3)
            v = v.reshape(*v.shape[:2], self.num_kv_heads, -1).transpose(0, 2, 1, 3)
            q, k = part.rotate(q), part.rotate(k)  # (B, H, L, D)
            if part.cache is not None:
                k, v = part.cache.update_and_fetch(k, v)
            out = attention(q, k, v, self.scale, part.mask)
            outs.append(out.transpose(0, 2, 1, 3).reshape(q.shape[0], q.shape[2], -1))
        return rows_through(self.o_proj, outs)


class MLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(self, x, rotate: Rotation, mask, cache: LayerCache | None, keep: int = 0):
        """The next hidden states of every token of x, or of its last `keep` (0: all) while
        every token still goes into the cache."""
        return self.segments([x], [Segment(rotate, mask, cache, keep)])[0]

    def segments(self, xs: list[mx.array], parts: list[Segment]) -> list[mx.array]:
        """`__call__` for several inputs at once (see `Attention.segments`): every matmul is one
        over all their rows."""
        hs = [self.input_layernorm(x) for x in xs]
        xs = [x[:, -part.keep :] if part.keep else x for x, part in zip(xs, parts, strict=True)]
        attended = self.self_attn.segments(hs, parts)
        xs = [x + a for x, a in zip(xs, attended, strict=True)]
        normed = [self.post_attention_layernorm(x) for x in xs]
        return [x + m for x, m in zip(xs, rows_through(self.mlp, normed), strict=True)]


class TextModel(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config) for _ in range(config.num_hidden_layers)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self._rope = MRoPE(config)

    def __call__(
        self,
        embeds: mx.array,
        positions: mx.array | int,
        cache: list[LayerCache] | None = None,
        keep: int = 0,
        layers_per_eval: int = 0,
        mask: mx.array | None = None,
    ) -> mx.array:
        """embeds (B, L, C) at positions (3, B, L) -> final hidden states (B, L, C), or of the
        last `keep` tokens only (B, keep, C): the last layer then computes just the keys and
        values of the others, which is all the cache needs of them.

        layers_per_eval: the caller's plan for a GPU backend, which may hold every intermediate
        of an evaluated graph: the hidden states (and with them the caches) are evaluated after
        every this many layers (0: never; the layers themselves never evaluate).

        positions may also be (B,) or an int: each row is text continuing from that position.
        mask: a boolean (B, 1, L, keys) mask replacing the causal rule (a batch's padding, see
        `BatchCache.attention_mask`).
        """
        return self.segments([(embeds, positions, cache, keep, mask)], layers_per_eval)[0]

    def segments(self, inputs: list[tuple], layers_per_eval: int = 0) -> list[mx.array]:
        """`__call__` for several inputs in one pass, each (embeds, positions, cache, keep,
        mask) as `__call__` takes them, e.g. a batch's decode rows and a prompt's chunk: every
        matmul takes all their rows at once (on a CPU or GPU a few more rows cost little more
        than the weights' one read), and each input attends to its own cache."""
        kernel = rope_kernel(device_kind())
        rotations, masks = [], []
        for embeds, positions, _, _, mask in inputs:
            rotations.append(self._rope(positions, embeds.dtype, embeds.shape[1], kernel))
            # Causal over the new tokens; MLX aligns the causal mask to the end of a longer
            # cached key list (and of the keys when the last layer keeps only the last queries).
            masks.append(mask if mask is not None else "causal" if embeds.shape[1] > 1 else None)
        caches = [cache or [None] * len(self.layers) for _, _, cache, _, _ in inputs]
        xs = [embeds for embeds, *_ in inputs]
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            parts = [
                Segment(rotate, mask, cache[i], keep if i == last else 0)
                for rotate, mask, cache, (*_, keep, _) in zip(
                    rotations, masks, caches, inputs, strict=True
                )
            ]
            xs = layer.segments(xs, parts)
            if layers_per_eval and (i + 1) % layers_per_eval == 0 and i < last:
                mx.eval(xs)
        return [self.norm(x) for x in xs]
