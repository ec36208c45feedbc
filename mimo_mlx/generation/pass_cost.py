"""What a forward pass over k tokens costs against one: how long prompt-lookup drafts should be.

Verifying a draft of n tokens is one pass over n + 1 tokens (rows). Where the kernels read each
weight once for all the rows (a float matmul on a GPU or with a threaded BLAS), that pass costs
little more than a decode step, and long drafts pay. Where they do not, a pass over k rows costs
up to k decode steps: MLX's CPU quantized matmul is a loop over rows, and its Metal 4-bit kernel
reads the weights once per row for 2 to 8 rows (8 rows cost 6.1 one-row passes, ml-explore/mlx
issue 4265). There a draft pays only if most of it is accepted, or never.

`PassCost` holds the cost of k rows relative to one, for k = 1..K. `draft_length` picks the draft
with the most expected tokens per unit of cost for an acceptance rate (each draft token accepted
with probability p while the ones before it were), and 0 when no length beats plain decoding by
`MARGIN` (a verification also waits for its input on the host, which a plain step does not).
`measure_pass_cost` measures it on the device the model runs on, with a small part of a decode
step's work per timing: the first decoder layer's gate projection (one of its largest matmuls,
the model's own layer and kernel) on k rows, for k = 1, K and a few counts between (around 8
and 9 rows, where MLX's kernels change); the counts between those are interpolated. If K rows
cost nearly K single rows, nothing else is measured: kernels share the weight read across more
rows, not fewer, so no draft pays.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

MARGIN = 0.1  # a draft must promise this much more than plain decoding's one token per step
PROBE_ROUNDS = 3  # timings per row count, the fastest kept: noise (another process) only adds
PROBE_ROWS = (2, 3, 5, 8, 9, 12)  # row counts measured between 1 and K (MLX switches at 8 / 9)


@dataclass(frozen=True)
class PassCost:
    """ratios[k - 1]: the time of a pass over k rows / the time of a pass over one row;
    `measured`: the row counts timed (the others interpolated or, past no sharing, taken as k)."""

    ratios: tuple[float, ...]
    measured: tuple[int, ...] = ()

    @classmethod
    def flat(cls, rows: int) -> PassCost:
        """Every row count costs one step (an ideal kernel; for tests and forced drafting)."""
        return cls((1.0,) * rows)

    @property
    def max_draft(self) -> int:
        return len(self.ratios) - 1

    def draft_length(self, acceptance: float, limit: int) -> int:
        """The draft length (0..limit, at most `max_draft`) with the most expected tokens per unit
        of cost when each draft token is accepted with probability `acceptance`; 0 when none
        promises more than 1 + MARGIN tokens per step."""
        best, best_value = 0, 1.0 + MARGIN
        expected = 1.0  # the pass's own token always comes
        for n in range(1, min(limit, self.max_draft) + 1):
            expected += acceptance**n
            value = expected / self.ratios[n]
            if value > best_value:
                best, best_value = n, value
        return best

    def scaled(self, rows: int, observed: float) -> PassCost:
        """This cost raised to what a pass over `rows` rows was seen to cost in decoding
        (`observed` steps): every count above one scaled by observed / ratios[rows - 1], where
        that is above 1 (the probe's shape, the level decoding saw). A whole pass costs more than
        the probe's one matmul where something besides the weight read grows with the rows or
        with a new shape: on MLX's CUDA backend a pass over several tokens at a cache length not
        seen before cost 30-50 decode steps (benchmarks/gpu/pass_offsets.py)."""
        factor = observed / self.ratios[rows - 1]
        if factor <= 1:
            return self
        ratios = (1.0, *(r * factor for r in self.ratios[1:]))
        return PassCost(ratios, self.measured)

    @property
    def pays(self) -> bool:
        """Whether any draft could pay, even one that is always accepted."""
        return self.draft_length(1.0, self.max_draft) > 0


def measure_pass_cost(model: nn.Module, rows: int) -> PassCost:
    """The cost of 1..`rows` rows against one, measured on `model`'s first decoder layer's gate
    projection (`model.model.layers[0].mlp.gate_proj`); see the module docstring."""
    layer = model.model.layers[0].mlp.gate_proj
    width = layer.weight.shape[-1] * (32 // getattr(layer, "bits", 32))  # packed when quantized
    dtype = model.model.norm.weight.dtype

    def fastest(*counts: int) -> list[float]:
        """The fastest time of each row count, the counts taking turns within each round."""
        inputs = [mx.full((1, k, width), 0.01, dtype) for k in counts]
        mx.eval(inputs)
        best = [float("inf")] * len(counts)
        for _ in range(PROBE_ROUNDS):
            for i, x in enumerate(inputs):
                start = time.perf_counter()
                mx.eval(layer(x))
                best[i] = min(best[i], time.perf_counter() - start)
        return best

    if rows == 1:
        return PassCost((1.0,), (1,))
    one, last = fastest(1, rows)
    if last / one >= rows * (1 - MARGIN):  # no sharing at the most rows: none below either
        return PassCost(tuple(float(k) for k in range(1, rows + 1)), (1, rows))
    between = [k for k in PROBE_ROWS if k < rows]
    known = {1: 1.0, rows: last / one}
    known.update({k: t / one for k, t in zip(between, fastest(*between), strict=True)})
    return PassCost(tuple(_interpolate(known, k) for k in range(1, rows + 1)), tuple(sorted(known)))


def _interpolate(known: dict[int, float], k: int) -> float:
    """known[k], or the straight line between the nearest measured counts below and above."""
    if k in known:
        return known[k]
    below = max(j for j in known if j < k)
    above = min(j for j in known if j > k)
    return known[below] + (known[above] - known[below]) * (k - below) / (above - below)
