"""The prompt-lookup scenario: a copy-heavy task and plain ones, with and without lookup.

Random weights never repeat their prompt, so the copy-heavy task gets a model that does, built
honestly (`follow_chain`): the head is tied to a permutation of the embedding rows and the layers'
residual writes are scaled down, so the greedy choice after token x is a fixed successor(x), the
successors forming one cycle through every ordinary text id. Every layer still runs at full cost.

- copy: the prompt holds the chain the answer will follow (its first `answer_tokens` + 16 links,
  after an image and some random text), and ends with the link before it: the answer repeats
  prompt text, as an OCR answer repeats the page.
- plain: the same prompt with random text where the chain was: nothing to copy.
- shuffled: the chain's tokens in a random order: every token of the answer is found in the prompt
  but never followed by its successor, so every lookup's draft would be wrong (lookup's worst case).

Each is decoded greedily with `generate_step` and with `lookup_generate_step` (default options),
alternating; the tokens must agree. Figures: wall-clock decode tok/s ((tokens - 1) / (last token
time - first token time)) and tokens per forward pass (prompt's last pass included; plain
decoding: 1), and where lookup's decode time went: drafting (host lookups), verification passes
(queued to read back), cache trims, measuring the pass cost, and the plain steps between.
This measures the mechanism on a synthetic model, not MiMo-VL's acceptance rates.

First, `pass_costs`: a whole forward pass over k tokens against one (k = 1..16) on this device,
beside what lookup's own probe (`generation.pass_cost`) measures and the draft lengths it then
chooses; each k's first call is reported apart (on a GPU backend it includes compiling kernels
for the new shape). `measure` reports its progress after each part, so a run cut short by its
time limit still says where the time went.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mimo_mlx.generation.lookup import PromptLookup
from mimo_mlx.generation.loop import generate_step, lookup_generate_step
from mimo_mlx.generation.pass_cost import measure_pass_cost
from mimo_mlx.model.mimo_vl import Model

from .inputs import image_inputs
from .stats import summarize

TASKS = ("copy", "plain", "shuffled")
COST_ROWS = 16  # pass costs measured for 1..COST_ROWS tokens
COST_CONTEXT = 256  # tokens in the cache the measured passes continue
WRITE_SCALE = 1e-3  # the layers' residual writes, relative to the embedding that carries the token
HEAD_SCALE = 8.0  # length of each head row: the chosen token's logit stands far above the rest


def text_limit(config) -> int:
    """Ordinary text ids are those below the special ids the config names (end, vision)."""
    specials = (config.image_token_id, config.video_token_id, config.vision_start_token_id)
    return min(*specials, *config.eos_token_id)


def follow_chain(model: Model, seed: int = 0) -> np.ndarray:
    """Make `model`'s greedy choice after token x be successor[x] (returned, over the whole
    vocabulary; special ids map to themselves). Float and quantized layers alike."""
    text = model.config.text
    if text.tie_word_embeddings:
        raise ValueError("follow_chain needs an untied lm_head")
    limit = text_limit(model.config)
    order = np.random.default_rng(seed).permutation(limit)
    successor = np.arange(text.vocab_size)
    successor[order] = np.roll(order, -1)  # one cycle through every ordinary text id
    predecessor = np.argsort(successor)
    embed = _dense(model.model.embed_tokens).astype(mx.float32)
    rows = embed[mx.array(predecessor)]  # head row j is the embedding of the token before j
    head = HEAD_SCALE * rows / mx.linalg.norm(rows, axis=1, keepdims=True)
    _set_weight(model.lm_head, head)
    for layer in model.model.layers:
        _scale(layer.self_attn.o_proj, WRITE_SCALE)
        _scale(layer.mlp.down_proj, WRITE_SCALE)
    mx.eval(model.parameters())
    return successor


def _dense(layer: nn.Module) -> mx.array:
    if isinstance(layer, nn.QuantizedEmbedding | nn.QuantizedLinear):
        return mx.dequantize(
            layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits, mode=layer.mode
        )
    return layer.weight


def _set_weight(layer: nn.Module, weight: mx.array) -> None:
    if isinstance(layer, nn.QuantizedLinear):
        quantized = mx.quantize(weight, layer.group_size, layer.bits, mode=layer.mode)
        layer.weight, layer.scales, layer.biases = quantized
    else:
        layer.weight = weight.astype(layer.weight.dtype)


def _scale(layer: nn.Module, factor: float) -> None:
    """Scale a linear layer's weight exactly (a quantized one through its scales and biases)."""
    if isinstance(layer, nn.QuantizedLinear):
        layer.scales = layer.scales * factor
        layer.biases = layer.biases * factor
    else:
        layer.weight = layer.weight * factor


def chain(successor: np.ndarray, first: int, length: int) -> list[int]:
    links = [int(first)]
    for _ in range(length - 1):
        links.append(int(successor[links[-1]]))
    return links


def task_prompt(model: Model, successor: np.ndarray, task: str, answer_tokens: int, grid, seed=0):
    """(1, L) ids for `task`: random text, the image's placeholders, the middle part (the chain,
    random text or the chain shuffled), random text, then the token whose successor starts the
    chain."""
    config = model.config
    rng = np.random.default_rng(seed)
    limit = text_limit(config)
    length = answer_tokens + 16
    start = int(rng.integers(0, limit))
    links = chain(successor, successor[start], length)
    middle = {
        "copy": links,
        "plain": rng.integers(0, limit, length).tolist(),
        "shuffled": rng.permutation(links).tolist(),
    }[task]
    pads = int(np.prod(grid, axis=1).sum()) // config.vision.spatial_merge_size**2
    image = [
        config.vision_start_token_id,
        *[config.image_token_id] * pads,
        config.vision_end_token_id,
    ]
    before, after = rng.integers(0, limit, 8).tolist(), rng.integers(0, limit, 8).tolist()
    return np.array([before + image + middle + after + [start]], dtype=np.int64), links


def pass_costs(model: Model, rows: int = COST_ROWS, runs: int = 3) -> dict:
    """Seconds of a whole forward pass over k tokens continuing a cache (k = 1..rows; logits for
    every row, as a verification pass computes them): each k's first call apart, then the
    fastest of `runs` (noise only adds time) and its ratio to k = 1's; and what lookup's probe
    measures on the same model."""
    limit = text_limit(model.config)
    ids = np.random.default_rng(1).integers(0, limit, (1, COST_CONTEXT + rows))
    cache = model.make_cache()
    prompt = model.prepare_prompt(ids[:, :COST_CONTEXT], cache=cache)
    mx.eval(model(**prompt.chunk(0), cache=cache, logits_to_keep=1))
    first, fastest = [], []
    for k in range(1, rows + 1):
        tokens = mx.array(ids[:, COST_CONTEXT : COST_CONTEXT + k])
        times = []
        for _ in range(runs + 1):
            start = time.perf_counter()
            mx.eval(model(tokens, cache=cache))
            times.append(time.perf_counter() - start)
            cache.trim(k)
        first.append(times[0])
        fastest.append(min(times[1:]))
    start = time.perf_counter()
    probe = measure_pass_cost(model, rows)
    probe_s = time.perf_counter() - start
    draft = {f"{p:g}": probe.draft_length(p, rows - 1) for p in (0.5, 0.75, 0.9, 1.0)}
    return {
        "rows": list(range(1, rows + 1)),
        "first_call_s": first,
        "pass_s": fastest,
        "pass_ratio": [m / fastest[0] for m in fastest],
        "probe_ratio": list(probe.ratios),
        "probe_measured": list(probe.measured),
        "probe_s": probe_s,
        "draft_length_at_acceptance": draft,
        "context": COST_CONTEXT,
    }


def decode(model: Model, ids, pixels, grid, tokens: int, lookup: bool) -> dict:
    """One greedy generation: its tokens, the time of each, the forward passes it took and
    (with lookup) where its decode time went."""
    cache = model.make_cache()
    prompt = model.prepare_prompt(ids, pixel_values=pixels, image_grid_thw=grid, cache=cache)
    found = PromptLookup() if lookup else None
    if found is None:
        steps = (
            (t, None)
            for t, _ in generate_step(prompt, model, max_tokens=tokens, prompt_cache=cache)
        )
    else:
        steps = (
            (t, d)
            for t, _, d in lookup_generate_step(
                prompt, model, lookup=found, max_tokens=tokens, prompt_cache=cache
            )
        )
    out = [(t, time.perf_counter()) for t, _ in steps]
    passes = found.passes if found else len(out)
    decode_s = out[-1][1] - out[0][1]
    return {
        "tokens": [t for t, _ in out],
        "decode_tps": (len(out) - 1) / decode_s,
        "passes": passes,
        "drafted": found.drafted if found else 0,
        "accepted": found.accepted if found else 0,
        "verifications": found.verifications if found else 0,
        "seconds": _where(found, decode_s),
    }


def _where(found: PromptLookup | None, decode_s: float) -> dict:
    """Decode seconds by what they went to; `steps`: the rest (plain steps, reading tokens)."""
    parts = dict(found.seconds) if found else {}
    return {**parts, "steps": decode_s - sum(parts.values()), "decode": decode_s}


def measure(
    model: Model,
    image_size: int,
    answer_tokens: int,
    warmup: int,
    runs: int,
    progress: Callable[[dict], None] = lambda partial: None,
) -> dict:
    """Every task with and without lookup, alternating, after `warmup` rounds; `progress` gets
    the result so far after each part."""
    clock = time.perf_counter()
    successor = follow_chain(model)
    pixels, grid = image_inputs(image_size)
    result = {"answer_tokens": answer_tokens, "image_size": image_size, "tasks": {}}
    result["phases_s"] = {"follow_chain": time.perf_counter() - clock}
    progress(result)
    clock = time.perf_counter()
    result["pass_cost"] = pass_costs(model)
    result["phases_s"]["pass_cost"] = time.perf_counter() - clock
    progress(result)
    for task in TASKS:
        clock = time.perf_counter()
        ids, links = task_prompt(model, successor, task, answer_tokens, grid)
        found = {"without": [], "with": []}
        for round_ in range(warmup + runs):
            for name in ("without", "with"):
                run = decode(model, ids, pixels, grid, answer_tokens, lookup=name == "with")
                if round_ >= warmup:
                    found[name].append(run)
        entry = {"prompt_tokens": int(ids.shape[1])}
        for name, results in found.items():
            last = results[-1]
            entry[name] = {
                "decode_tps": summarize([r["decode_tps"] for r in results]),
                "tokens_per_pass": len(last["tokens"]) / last["passes"],
                "drafted": last["drafted"],
                "accepted": last["accepted"],
                "verifications": last["verifications"],
                "seconds": {
                    k: summarize([r["seconds"][k] for r in results]) for k in last["seconds"]
                },
            }
        plain_tokens, lookup_tokens = found["without"][-1]["tokens"], found["with"][-1]["tokens"]
        entry["identical"] = plain_tokens == lookup_tokens
        entry["answer_follows_chain"] = plain_tokens == links[: len(plain_tokens)]
        medians = [entry[n]["decode_tps"]["median"] for n in ("with", "without")]
        entry["speedup"] = medians[0] / medians[1]
        result["tasks"][task] = entry
        result["phases_s"][task] = time.perf_counter() - clock
        progress(result)
    return result
