"""Forecasting: polynomial extrapolation of cached features, and the engine's forecast action."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import engine_dit_pipeline, engine_pixart_pipeline, generate

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


# ------------------------------------------------------------------------------------------------
# Learned linear forecasts (forecast_fit) and dual forecasting
# ------------------------------------------------------------------------------------------------
def test_weighted_with_lagrange_weights_is_the_extrapolation_at_uneven_spacing():
    from dualcache_diffusers.forecast import weighted

    history = [(s, torch.randn(3, dtype=torch.float64)) for s in (0, 3, 4)]
    for target in (5, 7):
        torch.testing.assert_close(weighted(history, lagrange_weights([0, 3, 4], target)),
                                   extrapolate(history, target, 2))
    with pytest.raises(ValueError, match="3 forecast weights but only 2"):
        weighted(history[:2], [0.1, 0.2, 0.7])


def _stats_from(history: torch.Tensor, target: torch.Tensor):
    """StepStats of ``history`` (samples, L, D) and ``target`` (samples, D)."""
    from dualcache_diffusers.forecast_fit import StepStats

    stats = StepStats(history.shape[1])
    for h, y in zip(history, target):
        stats.add(list(h), y)
    return stats


@pytest.mark.parametrize("order, steps, target", [(1, (3, 5), 7), (2, (0, 3, 4), 6)])
def test_the_fit_on_polynomial_trajectories_recovers_the_lagrange_weights(order, steps, target):
    """Features polynomial of degree ``order`` in the step: the only exact linear forecast is Lagrange's, so
    least squares (no prior) finds it, with the right sign and offset at uneven spacing."""
    from dualcache_diffusers.forecast_fit import solve_ridge

    generator = torch.Generator().manual_seed(0)
    coefficients = torch.randn(40, order + 1, 16, generator=generator, dtype=torch.float64)  # 40 trajectories

    def feature(step):
        return sum(coefficients[:, i] * step**i for i in range(order + 1))

    stats = _stats_from(torch.stack([feature(s) for s in steps], dim=1), feature(target))
    weights = solve_ridge(stats, [0.0] * (order + 1), ridge=0.0)
    np.testing.assert_allclose(weights, lagrange_weights(steps, target), atol=1e-8)
    assert stats.error(weights) < 1e-12 * stats.target


def test_the_ridge_fit_recovers_known_weights_and_never_loses_to_its_prior():
    from dualcache_diffusers.forecast_fit import solve_ridge

    generator = torch.Generator().manual_seed(1)
    history = torch.randn(50, 3, 32, generator=generator, dtype=torch.float64)
    true = torch.tensor([0.2, -0.7, 1.4], dtype=torch.float64)
    target = torch.einsum("sld,l->sd", history, true) + 0.01 * torch.randn(50, 32, generator=generator,
                                                                           dtype=torch.float64)
    stats = _stats_from(history, target)
    np.testing.assert_allclose(solve_ridge(stats, [0.0, -1.0, 2.0], ridge=1e-6), true.numpy(), atol=2e-3)
    prior = [0.0, -1.0, 2.0]  # a "Taylor" prior that is wrong for this data
    for ridge in (0.0, 1e-3, 0.1, 10.0, 1e6):
        weights = solve_ridge(stats, prior, ridge)
        assert stats.error(weights) <= stats.error(prior)
    assert np.allclose(solve_ridge(stats, prior, 1e9), prior, atol=1e-4)  # a strong pull keeps the prior


def _fora_plan(pipe, steps: int, **overrides):
    from dualcache_diffusers import DualCacheConfig
    from dualcache_diffusers.adapters import find_adapter

    layout = find_adapter(pipe.transformer).layout(pipe.transformer)
    return DualCacheConfig.from_preset("fora", "dit", **overrides).build_plan(steps, layout)


def test_fit_forecast_weights_on_the_model_beats_taylor_on_its_calibration_data_and_drives_the_engine():
    from dualcache_diffusers import CachePlan
    from dualcache_diffusers.forecast_fit import fit_forecast_weights

    pipe = engine_dit_pipeline(num_layers=3)
    plan = _fora_plan(pipe, 12, forecast_order=1)
    fitted = fit_forecast_weights(pipe, plan, seeds=[5, 6], conditions=[1, 2], ridge=0.0, batch_size=2)
    forecasting = [i for i, s in enumerate(plan.steps) if s.forecast_order and i > 2]  # two full steps stored
    assert all(fitted.steps[i].forecast_weights is not None for i in forecasting)
    assert all(s.forecast_weights is None for s in fitted.steps if not s.forecast_order)
    report = fitted.metadata["forecast_fit"]["relative_error"]
    assert [r["step"] for r in report] == forecasting
    assert all(r["learned"] <= r["taylor"] + 1e-12 for r in report)
    assert any(r["learned"] < 0.99 * r["taylor"] for r in report)  # least squares does find something better
    assert report[0]["history_steps"] == [0, 3]
    fitted = CachePlan.from_json(fitted.to_json())  # plans carry the weights as data

    enable_dual_cache(pipe, "fora", forecast_order=1)
    lagrange = generate(pipe, steps=12)
    enable_dual_cache(pipe, plan=fitted)
    learned = generate(pipe, steps=12)
    assert not np.array_equal(learned, lagrange) and np.isfinite(learned).all()
    # the engine applies exactly the weights the plan holds: Lagrange's own weights give Lagrange's images,
    # and weights (0, 1) reuse the newest full computation, i.e. the plain FORA images
    for weights_of, config in [(lambda s: lagrange_weights([s - s % 3 - 3, s - s % 3], s), dict(forecast_order=1)),
                               (lambda s: (0.0, 1.0), dict(forecast_order=0))]:
        steps = [dataclasses.replace(s, forecast_weights=tuple(weights_of(i)) if i in forecasting else None)
                 for i, s in enumerate(plan.steps)]
        enable_dual_cache(pipe, plan=dataclasses.replace(plan, steps=steps))
        with_weights = generate(pipe, steps=12)
        enable_dual_cache(pipe, "fora", **config)
        np.testing.assert_allclose(with_weights, generate(pipe, steps=12), atol=1e-6)


def test_fit_forecast_weights_checks_its_arguments_and_leaves_the_cache_enabled():
    from dualcache_diffusers.api import get_engine
    from dualcache_diffusers.forecast_fit import fit_forecast_weights

    pipe = engine_dit_pipeline(num_layers=2)
    plan = _fora_plan(pipe, 6, forecast_order=1)
    for kwargs, error, words in [
        (dict(plan=_fora_plan(pipe, 6)), ValueError, "forecasts at no step"),
        (dict(seeds=[]), ValueError, "seeds"),
        (dict(seeds=[1.5]), ValueError, "seeds"),
        (dict(ridge=-1.0), ValueError, "ridge"),
        (dict(history=1), ValueError, "history"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(plan="plan.json"), TypeError, "plan"),
    ]:
        with pytest.raises(error, match=words):
            fit_forecast_weights(pipe, **{"plan": plan, "seeds": [1], **kwargs})
    enable_dual_cache(pipe, "duca", interval=4)
    fitted = fit_forecast_weights(pipe, plan, seeds=[1], conditions=[0], history=3)
    assert get_engine(pipe).config.interval == 4  # switched off for the calibration, enabled again after
    assert all(len(s.forecast_weights) == 3 for s in fitted.steps if s.forecast_weights is not None)


@pytest.mark.parametrize("order", [1, 2])
def test_history_bytes_are_the_extra_copies_in_the_models_dtype(order):
    from dualcache_diffusers.api import get_engine

    pipe = engine_dit_pipeline(num_layers=2)
    enable_dual_cache(pipe, "fora", forecast_order=0)
    generate(pipe, steps=10)
    reuse = cache_stats(pipe)
    assert reuse.history_bytes == 0 and reuse.as_dict()["history_bytes"] == 0
    enable_dual_cache(pipe, "fora", forecast_order=order)
    generate(pipe, steps=10)
    stats = cache_stats(pipe)
    # order k keeps k past outputs of every cached module beside the current one: 2 blocks x 2 modules x
    # (2 CFG halves x 2 images) x 64 tokens x width 64 x 4 bytes; FORA never skips the stack, so no stack history
    module_bytes = 2 * 2 * 4 * 64 * 64 * 4
    assert stats.history_bytes == order * module_bytes
    assert stats.cache_bytes == reuse.cache_bytes + order * module_bytes
    assert "forecast history" in stats.summary()
    state = next(iter(get_engine(pipe)._local.generation.branches.values())).models[0]
    dtypes = {v.dtype for entries in state.history.values() for _, v in entries}
    assert dtypes == {pipe.transformer.dtype}


def test_forecast_error_scores_the_worst_forecast_tokens_highest():
    from dualcache_diffusers.selection import forecast_error

    actual = torch.zeros(4, 6, 8)
    predicted = actual.clone()
    predicted[:2, 4] += 3.0  # first CFG half: token 4 is badly forecast
    predicted[2:, 1] += 1.0  # second half: token 1 a little
    score = forecast_error(predicted, actual, paired=True)
    assert score.shape == (2, 6) and score.argmax(dim=1).tolist() == [4, 4]
    assert forecast_error(predicted, actual, paired=False).argmax(dim=1).tolist() == [4, 4, 1, 1]


@pytest.mark.parametrize("selection", ["forecast_error", "forecast_error+vnorm"])
@pytest.mark.parametrize("make", [engine_dit_pipeline, engine_pixart_pipeline])
def test_dual_forecasting_selects_by_forecast_error_at_the_same_flops(selection, make):
    from dualcache_diffusers.api import get_engine

    pipe = make(num_layers=3)
    enable_dual_cache(pipe, "duca", forecast_order=1, selection="vnorm", fresh_ratio=0.3)
    vnorm = generate(pipe, steps=12)
    flops = cache_stats(pipe).flops
    enable_dual_cache(pipe, "duca", forecast_order=1, selection=selection, fresh_ratio=0.3)
    chosen = generate(pipe, steps=12)
    assert cache_stats(pipe).flops == flops and np.isfinite(chosen).all()
    assert not np.array_equal(chosen, vnorm)
    assert np.array_equal(generate(pipe, steps=12), chosen)
    state = next(iter(get_engine(pipe)._local.generation.branches.values())).models[0]
    # one score row per image (the CFG halves share one), per block, from the last full step
    assert sorted(state.forecast_errors) == [0, 1, 2]
    assert all(e.shape == (2, 64) for e in state.forecast_errors.values())


def test_reanchoring_makes_the_partial_steps_output_the_newest_forecast_point():
    from dualcache_diffusers.api import get_engine

    pipe = engine_dit_pipeline(num_layers=3)
    kwargs = dict(forecast_order=1, fresh_ratio=0.3, interval=4)  # F,C,A,C: the second C forecasts from the first
    enable_dual_cache(pipe, "duca", **kwargs)
    plain = generate(pipe, steps=12)
    flops = cache_stats(pipe).flops
    enable_dual_cache(pipe, "duca", **kwargs, forecast_reanchor=True)
    anchored = generate(pipe, steps=12)
    assert cache_stats(pipe).flops == flops and not np.array_equal(anchored, plain)
    engine = get_engine(pipe)
    state = next(iter(engine._local.generation.branches.values())).models[0]
    kinds = engine.denoisers[0].plan(12).kinds()
    assert kinds[8:] == ["full", "conservative", "aggressive", "conservative"]
    # the MLP ("ff", column 1) is recomputed in part at step 11: its output there is each block's anchor
    assert {key: step for key, (step, _) in state.anchors.items()} == {(b, 1, 0): 11 for b in range(3)}
    assert all(kinds[step] == "full" for entries in state.history.values() for step, _ in entries)
    assert cache_stats(pipe).history_bytes > 0
    with pytest.raises(TypeError, match="forecast_reanchor"):
        enable_dual_cache(pipe, "duca", forecast_reanchor="yes")


def test_forecast_weights_reach_a_compiled_region_as_a_tensor():
    """Eager, ForecastWeights combine with their floats; compiled, with their tensor: one graph for any weights."""
    from torch._dynamo.testing import CompileCounter

    from dualcache_diffusers.forecast import ForecastWeights, combine

    values = [torch.randn(2, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    backend = CompileCounter()
    torch._dynamo.reset()
    forecast = torch.compile(lambda weights: combine(values, weights), backend=backend)
    try:
        for steps, target in [((0, 3, 6), 7), ((0, 3, 6), 8), ((2, 4, 9), 13)]:
            weights = ForecastWeights.of(lagrange_weights(steps, target), "cpu")
            assert torch.equal(combine(values, weights), combine(values, weights.values))
            torch.testing.assert_close(forecast(weights), combine(values, weights.values))
    finally:
        torch._dynamo.reset()
    assert backend.frame_count == 1
