"""Prompt lookup sizes its drafts from what a pass over k tokens costs on the device.

`PassCost.draft_length` on hand-made cost curves (the CPU's 4-bit matmul, a flat one, Metal's 4-bit
kernel that shares nothing for 2-8 rows); `measure_pass_cost` on stand-in layers whose time is
known (sleeps), and on a real tiny model; and lookup itself: where no draft can pay it never
verifies one and decodes exactly as plain decoding does.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from test_prompt_lookup import chain_model, copy_prompt, looked_up, plain  # noqa: F401

from mimo_mlx.generation.lookup import PromptLookup
from mimo_mlx.generation.pass_cost import PassCost, measure_pass_cost

LINEAR = PassCost(tuple(float(k) for k in range(1, 12)))  # MLX's CPU 4-bit matmul: k rows, k steps
# Metal's 4-bit kernel as ml-explore/mlx#4265 measured it: 8 rows cost 6.1 rows, more rows share.
METAL_4BIT = PassCost((1.0, 1.7, 2.4, 3.1, 3.8, 4.5, 5.3, 6.1, 1.6, 1.7, 1.8, 1.9))


def test_no_draft_pays_where_every_row_costs_a_step():
    assert not LINEAR.pays
    assert all(LINEAR.draft_length(p, 10) == 0 for p in (0.1, 0.5, 0.9, 1.0))


def test_a_flat_cost_drafts_as_much_as_allowed():
    flat = PassCost.flat(11)
    assert flat.pays and flat.draft_length(0.75, 10) == 10 and flat.draft_length(0.75, 3) == 3
    assert flat.draft_length(0.05, 10) == 0  # almost never accepted: a verification is not free


def test_a_kernel_that_shares_only_above_8_rows_gets_long_drafts_or_none():
    assert METAL_4BIT.pays
    assert METAL_4BIT.draft_length(0.8, 11) >= 8  # 9 rows and more share the weight read
    assert METAL_4BIT.draft_length(0.8, 7) == 0  # capped below that, nothing pays
    assert METAL_4BIT.draft_length(0.9, 7) == 2  # unless nearly every draft token is accepted
    assert METAL_4BIT.draft_length(0.3, 11) == 0


class Sleeper:
    """A stand-in layer whose call over k rows takes `seconds(k)` (time.sleep)."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.weight = mx.zeros((8, 16))

    def __call__(self, x: mx.array) -> mx.array:
        time.sleep(self.seconds(x.shape[1]))
        return x


def stand_in(seconds) -> SimpleNamespace:
    """A model as `measure_pass_cost` sees it: a first layer's gate projection, a dtype."""
    mlp = SimpleNamespace(gate_proj=Sleeper(seconds))
    norm = SimpleNamespace(weight=mx.ones(16))
    return SimpleNamespace(model=SimpleNamespace(layers=[SimpleNamespace(mlp=mlp)], norm=norm))


def test_measuring_stops_at_the_largest_row_count_when_it_costs_a_step_per_row():
    calls = []
    model = stand_in(lambda k: calls.append(k) or 0.004 * k)
    cost = measure_pass_cost(model, 8)
    assert cost.ratios == tuple(float(k) for k in range(1, 9)) and not cost.pays
    assert set(calls) == {1, 8} and cost.measured == (1, 8)  # nothing between was measured


def test_measuring_a_few_row_counts_where_rows_share_the_work():
    calls = []
    model = stand_in(lambda k: calls.append(k) or 0.004 + 0.0004 * k)
    cost = measure_pass_cost(model, 11)
    assert set(calls) == set(cost.measured) == {1, 2, 3, 5, 8, 9, 11}
    assert len(cost.ratios) == 11 and cost.ratios[0] == 1.0
    assert all(0.9 < r < 2.5 for r in cost.ratios)  # sleeps only ever overshoot a little
    r = cost.ratios  # 4, 6, 7 and 10 rows lie on the lines between their measured neighbours
    assert r[3] == pytest.approx((r[2] + r[4]) / 2)
    assert r[5] == pytest.approx(r[4] + (r[7] - r[4]) / 3)
    assert r[9] == pytest.approx((r[8] + r[10]) / 2)
    assert cost.draft_length(0.9, 10) == 10


def test_measuring_a_real_model(chain_model):  # noqa: F811
    model, _ = chain_model
    cost = measure_pass_cost(model, 11)
    assert len(cost.ratios) == 11 and cost.ratios[0] == 1.0
    assert all(r > 0 for r in cost.ratios)


def test_where_no_draft_pays_lookup_decodes_as_plain_decoding(chain_model):  # noqa: F811
    model, successor = chain_model
    ids, vision, links = copy_prompt(model, successor, answer=60)
    tokens, logprobs, cache = plain(model, ids, vision, tokens=60)
    ours, our_logprobs, from_draft, our_cache, lookup = looked_up(
        model, ids, vision, tokens=60, lookup=PromptLookup(cost=LINEAR)
    )
    assert ours == tokens == links[:60]
    np.testing.assert_allclose(np.stack(our_logprobs), np.stack(logprobs), atol=1e-4)
    assert lookup.verifications == lookup.drafted == 0 and not any(from_draft)
    assert lookup.passes == 60 and our_cache.offset == cache.offset


def test_the_cost_is_measured_once_when_a_draft_is_first_wanted(chain_model):  # noqa: F811
    model, successor = chain_model
    ids, vision, _ = copy_prompt(model, successor, answer=40)
    lookup = PromptLookup(num_tokens=4)
    ours, *_ = looked_up(model, ids, vision, tokens=40, lookup=lookup)
    assert ours == plain(model, ids, vision, tokens=40)[0]
    assert lookup.cost is not None and len(lookup.cost.ratios) == 5  # 4 drafted + its own
    assert lookup.seconds["measuring"] > 0 and lookup.seconds["drafting"] > 0
