"""Decode overhead: mimo-mlx's time per decode step against the same MLX kernels run alone.

`kernel_step_seconds` runs a straight-line function over the model's own weight arrays: per layer
rms_norm, the q/k/v/o/gate/up/down matmuls (`mx.addmm` / `mx.quantized_matmul`, what nn.Linear and
nn.QuantizedLinear call), the model's fused SwiGLU, the decoder's own rotation (`mx.fast.rope`
where the backend has a rope kernel, else one cos/sin per step), a KV write into a preallocated
buffer, sdpa; then the final norm, the head and an argmax. No modules, cache objects, sampler or
detokenizer. Steps are pipelined as in `generate_step` (the next step is queued before the token
is read), so the difference is the Python and graph-building cost above the kernels.
"""

from __future__ import annotations

import time

import mlx.core as mx
import mlx.nn as nn

from mimo_mlx.model.activations import swiglu
from mimo_mlx.model.backend import device_kind, rope_kernel


def linear(x: mx.array, layer: nn.Module) -> mx.array:
    """What the layer's __call__ computes, as bare kernel calls."""
    bias = layer.get("bias")
    if isinstance(layer, nn.QuantizedLinear):
        y = mx.quantized_matmul(
            x,
            layer["weight"],
            scales=layer["scales"],
            biases=layer.get("biases"),
            transpose=True,
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
        )
        return y if bias is None else y + bias
    if bias is None:
        return x @ layer["weight"].T
    return mx.addmm(bias, x, layer["weight"].T)


def embed(token: mx.array, layer: nn.Module) -> mx.array:
    if isinstance(layer, nn.QuantizedEmbedding):
        return mx.dequantize(
            layer["weight"][token],
            scales=layer["scales"][token],
            biases=layer["biases"][token],
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
        )
    return layer["weight"][token]


def make_step(model, length: int):
    """step(token (1,), offset) -> next token (1,), with KV buffers for `length` positions."""
    text = model.config.text
    heads, kv_heads, dim = text.num_attention_heads, text.num_key_value_heads, text.head_dim
    scale = dim**-0.5
    decoder = model.model
    dtype = decoder.norm.weight.dtype
    shape = (1, kv_heads, length, dim)
    keys = [mx.zeros(shape, dtype) for _ in decoder.layers]
    values = [mx.zeros(shape, dtype) for _ in decoder.layers]
    mx.eval(keys, values)
    head = getattr(model, "lm_head", None)

    kernel = rope_kernel(device_kind())

    def step(token: mx.array, offset: int) -> mx.array:
        x = embed(token, decoder.embed_tokens)[None]  # (1, 1, C)
        rotate = decoder._rope(offset, dtype, 1, kernel)  # the model's rotation for one token
        for i, layer in enumerate(decoder.layers):
            attn, mlp = layer.self_attn, layer.mlp
            h = mx.fast.rms_norm(x, layer.input_layernorm.weight, text.rms_norm_eps)
            q = linear(h, attn.q_proj).reshape(1, 1, heads, dim).transpose(0, 2, 1, 3)
            k = linear(h, attn.k_proj).reshape(1, 1, kv_heads, dim).transpose(0, 2, 1, 3)
            v = linear(h, attn.v_proj).reshape(1, 1, kv_heads, dim).transpose(0, 2, 1, 3)
            q, k = rotate(q), rotate(k)
            keys[i][..., offset : offset + 1, :] = k
            values[i][..., offset : offset + 1, :] = v
            o = mx.fast.scaled_dot_product_attention(
                q, keys[i][..., : offset + 1, :], values[i][..., : offset + 1, :], scale=scale
            )
            x = x + linear(o.transpose(0, 2, 1, 3).reshape(1, 1, -1), attn.o_proj)
            h = mx.fast.rms_norm(x, layer.post_attention_layernorm.weight, text.rms_norm_eps)
            gated = swiglu(linear(h, mlp.gate_proj), linear(h, mlp.up_proj))
            x = x + linear(gated, mlp.down_proj)
        x = mx.fast.rms_norm(x, decoder.norm.weight, text.rms_norm_eps)
        logits = linear(x[:, -1], head) if head is not None else decoder.embed_tokens.as_linear(x)
        return mx.argmax(logits.reshape(1, -1), axis=-1)

    return step


def kernel_step_seconds(model, prompt_tokens: int, steps: int, runs: int) -> list[float]:
    """Seconds per decode step of the bare-kernel loop, one figure per run (after one warm-up run),
    measured like the runtimes' decode: from the first token on the host to the last."""
    step = make_step(model, prompt_tokens + steps + 1)
    results = []
    for run in range(runs + 1):
        token = mx.array([0], dtype=mx.uint32)
        pending = step(token, prompt_tokens)
        mx.async_eval(pending)
        times = []
        for n in range(steps):
            token = pending
            if n + 1 < steps:
                pending = step(token, prompt_tokens + n + 1)
                mx.async_eval(pending)
            token.item()
            times.append(time.perf_counter())
        if run > 0:
            results.append((times[-1] - times[0]) / (steps - 1))
    return results
