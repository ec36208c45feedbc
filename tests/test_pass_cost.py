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


def test_a_cost_raised_to_what_decoding_saw_keeps_its_shape():
    probe = PassCost((1.0, 1.2, 1.4, 1.6), measured=(1, 4))
    seen = probe.scaled(3, 7.0)  # a pass over 3 rows took 7 steps: 5x what the probe promised
    assert seen.ratios == pytest.approx((1.0, 6.0, 7.0, 8.0)) and seen.measured == (1, 4)
    assert not seen.pays  # 4 tokens at best for 8 steps
    assert probe.scaled(3, 1.0) is probe  # cheaper than promised: the probe stands


def test_lookup_stops_drafting_when_verification_passes_cost_more_than_measured(
    chain_model,  # noqa: F811
    monkeypatch,
):
    """A measured cost that promised cheap passes, on a model whose passes over several tokens
    each take 0.25 s more (as on MLX's CUDA backend, where a pass at a new cache length builds
    its kernels): after two such verifications lookup warns and decodes plainly; the tokens are
    plain decoding's."""
    model, successor = chain_model
    ids, vision, links = copy_prompt(model, successor, answer=60)
    expected, _, _ = plain(model, ids, vision, tokens=60)
    promised = PassCost((1.0,) * 11, measured=(1, 11))
    call = type(model).__call__

    def slow(self, input_ids, *args, **kwargs):
        if input_ids.shape[1] > 1 and kwargs.get("cache") is not None and kwargs["cache"].offset:
            time.sleep(0.25)
        return call(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(type(model), "__call__", slow)
    lookup = PromptLookup(cost=promised)
    with pytest.warns(UserWarning, match="stopped drafting"):
        ours, _, from_draft, _, lookup = looked_up(model, ids, vision, tokens=60, lookup=lookup)
    assert ours == expected == links[:60]
    assert lookup.verifications == 2 and not lookup.cost.pays
    assert lookup.step_s is not None and lookup.step_s < 0.25


def test_verifications_raise_a_measured_cost_only_from_the_least_of_two():
    """The first verification alone changes nothing (it may include compiling its kernels); the
    least of the last two raises a measured cost, never lowers it; a fixed cost stays."""
    lookup = PromptLookup(cost=PassCost((1.0, 1.1, 1.2), measured=(1, 3)))
    lookup._plain_step(0.010)
    lookup._plain_step(0.020)  # the fastest plain step is the step's time
    lookup._verification_took(3, 0.300)  # 30 steps: compiling, say
    assert lookup.cost.ratios == (1.0, 1.1, 1.2)
    lookup._verification_took(3, 0.024)  # 2.4 steps: 2x what the probe promised
    assert lookup.cost.ratios == pytest.approx((1.0, 2.2, 2.4)) and lookup.cost.pays
    lookup._verification_took(3, 0.012)  # cheaper than the cost now says: it stays
    assert lookup.cost.ratios == pytest.approx((1.0, 2.2, 2.4))
    fixed = PromptLookup(cost=PassCost.flat(3))
    fixed._plain_step(0.010)
    for seconds in (0.5, 0.5):
        fixed._verification_took(3, seconds)
    assert fixed.cost == PassCost.flat(3)
