"""Forecasting: polynomial extrapolation of cached features, and the engine's forecast action."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import engine_dit_pipeline, generate

from dualcache_diffusers import cache_stats, enable_dual_cache
from dualcache_diffusers.forecast import extrapolate, lagrange_weights
from dualcache_diffusers.plan import PlanLayout


@pytest.mark.parametrize("order", [1, 2, 3])
def test_a_polynomial_of_the_order_is_forecast_exactly_at_the_right_offset(order):
    coefficients = torch.randn(order + 1, 4, dtype=torch.float64)

    def feature(step: float) -> torch.Tensor:
        return sum(c * step**i for i, c in enumerate(coefficients))

    steps = [0, 3, 5, 9][: order + 1]  # uneven spacing between full steps
    history = [(s, feature(s)) for s in steps]
    for target in (10, 11, 13):  # ahead of the last full step, never behind it
        torch.testing.assert_close(extrapolate(history, target, order), feature(target))
    # a sign error (forecasting at -k) or plain reuse would not match
    assert not torch.allclose(extrapolate(history, 13, order), feature(steps[-1] - 4))


def test_order_one_is_a_linear_step_and_order_zero_is_reuse():
    history = [(0, torch.tensor([1.0])), (2, torch.tensor([3.0]))]
    assert extrapolate(history, 3, 1).item() == pytest.approx(4.0)
    assert extrapolate(history, 3, 0).item() == 3.0
    assert lagrange_weights([0, 2], 3) == pytest.approx([-0.5, 1.5])


def test_tuples_are_forecast_element_by_element_and_stored_values_are_untouched():
    a, b = torch.ones(2), torch.full((2,), 2.0)
    history = [(0, (a, None)), (1, (b, None))]
    out, none = extrapolate(history, 2, 1)
    assert none is None and torch.equal(out, torch.full((2,), 3.0))
    assert torch.equal(a, torch.ones(2)) and torch.equal(b, torch.full((2,), 2.0))


def test_the_plan_carries_the_forecast_order():
    from dualcache_diffusers import CachePlan, DualCacheConfig

    plan = DualCacheConfig("fora", forecast_order=2).build_plan(7, PlanLayout.uniform_layout(2, ("attn1", "ff")))
    assert [s.forecast_order for s in plan.steps] == [0, 2, 2, 0, 2, 2, 0]
    assert CachePlan.from_json(plan.to_json()).max_forecast_order == 2


@pytest.mark.parametrize("preset", ["fora", "duca", "toca"])
def test_forecasting_runs_with_the_same_flops_and_is_deterministic(preset):
    pipe = engine_dit_pipeline(num_layers=3)
    enable_dual_cache(pipe, preset, forecast_order=0)
    plain = generate(pipe, steps=12)
    plain_flops = cache_stats(pipe).flops
    enable_dual_cache(pipe, preset, forecast_order=1)
    forecast = generate(pipe, steps=12)
    stats = cache_stats(pipe)
    assert stats.flops == plain_flops  # a forecast is a weighted sum: no matmul
    assert np.isfinite(forecast).all() and not np.array_equal(forecast, plain)
    assert np.array_equal(generate(pipe, steps=12), forecast)
    assert stats.cache_bytes > 0


def test_duca_presets_forecast_by_default():
    from dualcache_diffusers import DualCacheConfig

    for family in ("dit", "pixart", "default"):
        assert DualCacheConfig.from_preset("duca", family).forecast_order == 1
        assert DualCacheConfig.from_preset("fora", family).forecast_order == 0  # the published baselines reuse
