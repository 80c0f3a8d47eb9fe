"""Steps that skip the whole denoiser call: the output is forecast from the full calls' outputs, at no cost."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import engine_dit_pipeline, engine_pixart_pipeline, generate

from dualcache_diffusers import CachePlan, cache_stats, disable_dual_cache, enable_dual_cache
from dualcache_diffusers.adapters import find_adapter
from dualcache_diffusers.api import get_engine
from dualcache_diffusers.budget import CostModel
from dualcache_diffusers.engine import _split_output
from dualcache_diffusers.forecast import lagrange_weights
from dualcache_diffusers.forecast_fit import fit_forecast_weights
from dualcache_diffusers.plan import StepPlan, full_plan

STEPS, FULL = 10, (0, 3, 6, 8)


def skip_call_plan(pipe, order: int) -> CachePlan:
    """Full calls at FULL, every other call skipped and forecast at ``order``."""
    plan = full_plan(STEPS, find_adapter(pipe.transformer).layout(pipe.transformer))
    for i, step in enumerate(plan.steps):
        if i not in FULL:
            plan.steps[i] = StepPlan("skip", [[0.0] * len(row) for row in step.fractions], skip_call=True,
                                     forecast_order=order)
    return plan


def generate_recorded(pipe, order: int) -> list[torch.Tensor]:
    """Generate with :func:`skip_call_plan`; the prediction of every denoiser call, as the pipeline receives it
    (a hook on the call itself)."""
    seen: list[torch.Tensor] = []

    def hook(module, args, output):
        seen.append((output[0] if isinstance(output, tuple) else output.sample).clone())

    enable_dual_cache(pipe, plan=skip_call_plan(pipe, order))
    handle = pipe.transformer.register_forward_hook(hook)
    try:
        generate(pipe, steps=STEPS)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("make", [engine_dit_pipeline, engine_pixart_pipeline])  # output class / tuple
@pytest.mark.parametrize("order", [0, 1, 2])
def test_a_skipped_call_returns_the_lagrange_forecast_of_the_full_calls(make, order):
    pipe = make(num_layers=2)
    seen = generate_recorded(pipe, order)
    assert len(seen) == STEPS
    for step in range(STEPS):
        if step in FULL:
            continue
        done = [s for s in FULL if s < step][-(order + 1):]
        expected = sum(w * seen[s] for w, s in zip(lagrange_weights(done, step), done))
        torch.testing.assert_close(seen[step], expected)
    # not plain reuse where the order asks for more (a sign or offset error would not match either)
    assert order == 0 or not torch.allclose(seen[4], seen[3])


def test_skipped_calls_cost_nothing_and_show_as_their_own_step_kind():
    pipe = engine_dit_pipeline(num_layers=2)
    plan = skip_call_plan(pipe, 1)
    assert plan.pattern() == "FSSFSSFSFS"
    layout = find_adapter(pipe.transformer).layout(pipe.transformer)
    assert CostModel.uniform(layout).ratio(plan) == pytest.approx(STEPS / len(FULL))
    enable_dual_cache(pipe, plan=plan)
    generate(pipe, steps=STEPS)
    stats = cache_stats(pipe)
    assert stats.flops_speedup == pytest.approx(STEPS / len(FULL))
    assert stats.step_kinds.count("skip") == STEPS - len(FULL)
    disable_dual_cache(pipe)


@pytest.mark.parametrize("order", [0, 1, 2])
def test_only_the_predictions_are_kept_for_skipped_calls(order):
    pipe = engine_dit_pipeline(num_layers=2)
    seen = generate_recorded(pipe, order)
    prediction = seen[0].numel() * seen[0].element_size()
    # order + 1 copies of the prediction, no module history (skipped calls read no module cache)
    assert cache_stats(pipe).history_bytes == (order + 1) * prediction
    engine = get_engine(pipe)
    assert engine.denoisers[0].steps_of(engine.denoisers[0].plan(STEPS), False).unread[3]  # F at 3, next run F at 6


def test_learned_forecasts_refuse_plans_that_skip_calls():
    pipe = engine_dit_pipeline(num_layers=2)
    with pytest.raises(ValueError, match="skip_call"):
        fit_forecast_weights(pipe, skip_call_plan(pipe, 1), seeds=[0])


def test_a_plan_with_skipped_calls_round_trips_as_format_4_and_older_formats_refuse_them():
    pipe = engine_dit_pipeline(num_layers=2)
    plan = skip_call_plan(pipe, 1)
    data = json.loads(plan.to_json())
    assert data["version"] == 4 and data["steps"][1]["skip_call"] is True and "skip_call" not in data["steps"][0]
    again = CachePlan.from_json(plan.to_json())
    assert [s.skip_call for s in again.steps] == [s.skip_call for s in plan.steps]
    assert again.resample(20).skips_calls

    older = dict(data, version=3)
    with pytest.raises(ValueError, match=r"steps\[1\]\.skip_call.*version 4"):
        CachePlan.from_dict(older)
    wrong = json.loads(plan.to_json())
    wrong["steps"][1]["skip_call"] = "true"
    with pytest.raises(TypeError, match=r"steps\[1\]\.skip_call"):
        CachePlan.from_dict(wrong)
    first = json.loads(plan.to_json())
    first["steps"][0]["skip_call"] = True
    with pytest.raises(ValueError, match="first step"):
        CachePlan.from_dict(first)


def test_an_output_without_a_leading_prediction_is_refused_by_name():
    tensor = torch.ones(1)
    assert _split_output((tensor, "extra"))[1](tensor * 2)[1] == "extra"
    with pytest.raises(TypeError, match=r"cannot skip calls.*dict"):
        _split_output({"sample": tensor})
