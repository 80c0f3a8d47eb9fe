"""Budget-driven schedules: enable_dual_cache(pipe, budget=b) reaches b as the engine and FlopCounterMode count."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
from conftest import engine_dit_pipeline, generate

from dualcache_diffusers import cache_stats, disable_dual_cache, enable_dual_cache
from dualcache_diffusers.api import get_engine
from dualcache_diffusers.budget import (
    DEFAULT_FIRST_GAP_WEIGHT,
    DEFAULT_MAX_SKIPPED_SHARE,
    FLOW_MAX_SKIPPED_SHARE,
    CostModel,
    Schedule,
    affordable_full_steps,
    budget_schedule,
    check_budget,
    fit_ratio,
    full_step_positions,
    largest_gap,
    samples_flow,
    schedule_plan,
    short_first_gap,
    short_tail,
    skipped_call_steps,
)
from dualcache_diffusers.plan import PlanLayout
from dualcache_diffusers.stats import count_flops

LAYOUT = PlanLayout.uniform_layout(4, ("attn1", "ff"))


@pytest.mark.parametrize("budget", [1.8, 2.5, 3.0, 4.0])
@pytest.mark.parametrize("steps", [10, 20])
def test_the_plan_reaches_the_budget_on_the_cost_model(budget, steps):
    cost = CostModel.uniform(LAYOUT, tokens=64)
    plan = budget_schedule(steps, LAYOUT, budget, cost)
    full = [i for i, s in enumerate(plan.steps) if s.is_full]
    # step 0, then evenly spaced (ending one step before the last where that lengthens no gap)
    assert full == full_step_positions(steps, len(full), 1, 1.0, tail=short_tail(steps, len(full)), short_first=True)
    gaps = [b - a for a, b in itertools.pairwise(full)]
    assert full[0] == 0 and max(gaps) - min(gaps) <= 1
    assert cost.ratio(plan) == pytest.approx(budget, rel=0.03)
    assert cost.ratio(plan) >= budget * 0.999  # from below in FLOPs: never more compute than asked
    assert plan.metadata["budget"]["target"] == budget


def test_the_partial_steps_recompute_more_tokens_early_in_the_run_and_in_early_layers():
    # DuCa's decreasing schedule (the default rule's principle 3), scaled to the budget
    cost = CostModel.uniform(LAYOUT, tokens=64)
    plan = budget_schedule(20, LAYOUT, 2.0, cost)
    partial = [s for s in plan.steps if not s.is_full and not s.skip_blocks]
    mlp = LAYOUT.modules.index("ff")
    first, last = partial[0].fractions, partial[-1].fractions
    assert first[0][mlp] > last[0][mlp] > 0  # earlier steps recompute more
    assert first[0][mlp] > first[-1][mlp]  # earlier layers recompute more
    assert plan.metadata["schedule"]["ratio_schedule"] == "pixart"


@pytest.mark.parametrize("budget", [2.0, 3.0])
def test_the_steps_before_the_second_full_step_recompute_the_first_gap_weight_times_the_fraction(budget):
    # they reuse step 0 (order 0), the weakest forecast of the run (principle 3)
    cost = CostModel.uniform(LAYOUT, tokens=64)
    plan = budget_schedule(20, LAYOUT, budget, cost)
    schedule = Schedule(**plan.metadata["schedule"])
    assert schedule.first_gap_weight == DEFAULT_FIRST_GAP_WEIGHT > 1
    unweighted = schedule_plan(20, LAYOUT, replace(schedule, first_gap_weight=1.0))
    second_full = [i for i, s in enumerate(plan.steps) if s.is_full][1]
    assert second_full > 1  # the run has a first gap
    mlp = LAYOUT.modules.index("ff")
    for i, (weighted, plain) in enumerate(zip(plan.steps, unweighted.steps, strict=True)):
        if i < second_full and not weighted.is_full:
            assert [row[mlp] for row in weighted.fractions] == pytest.approx(
                [min(1.0, DEFAULT_FIRST_GAP_WEIGHT * row[mlp]) for row in plain.fractions])
            assert 0 < plain.fractions[0][mlp] < weighted.fractions[0][mlp]
        else:
            assert weighted.fractions == plain.fractions


def test_more_budget_means_fewer_full_steps():
    cost = CostModel.uniform(LAYOUT, tokens=64)
    fulls = [sum(s.is_full for s in budget_schedule(20, LAYOUT, b, cost).steps) for b in (1.5, 2, 3, 4, 6)]
    assert fulls == sorted(fulls, reverse=True) and fulls[0] > fulls[-1]


def test_full_steps_start_the_run_and_are_spread_over_it():
    assert full_step_positions(20, 5, 2, 1.0)[:2] == [0, 1]
    even = full_step_positions(20, 6, 2, 1.0)
    front = full_step_positions(20, 6, 2, 2.0)
    assert len(set(even)) == 6 and len(set(front)) == 6 and max(even) < 20
    assert sum(front) < sum(even)  # warp > 1 moves full steps towards the start
    assert full_step_positions(5, 5, 2, 1.5) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(("steps", "full", "tail"),
                         [(20, 7, 1), (50, 15, 1), (20, 5, None), (20, 9, None), (20, 6, None)])
def test_one_forecast_step_follows_the_last_full_step_where_that_lengthens_neither_the_largest_nor_the_first_gap(
        steps, full, tail):
    even = full_step_positions(steps, full, 1, 1.0)
    assert short_tail(steps, full) == tail
    if tail is None:  # the even grid already ends one step before the last, or ending there would lengthen a gap
        shifted = full_step_positions(steps, full, 1, 1.0, tail=1)
        assert (even[-1] >= steps - 2 or largest_gap(shifted, steps) > largest_gap(even, steps)
                or shifted[1] > even[1])  # (20, 6): no gap grows but the first, 3 -> 4
        return
    shifted = full_step_positions(steps, full, 1, 1.0, tail=tail)
    assert even[-1] < steps - 2 and shifted[-1] == steps - 2 and len(set(shifted)) == full and shifted[0] == 0
    assert largest_gap(shifted, steps) == largest_gap(even, steps)


@pytest.mark.parametrize(("steps", "full"), [(20, 3), (50, 19), (50, 11), (20, 9), (20, 5)])
def test_the_first_gap_of_the_grid_is_its_shortest_and_no_gap_grows(steps, full):
    even = full_step_positions(steps, full, 1, 1.0)
    moved = full_step_positions(steps, full, 1, 1.0, short_first=True)
    assert moved == short_first_gap(even, 1, steps) and moved[0] == 0 and len(set(moved)) == full
    gaps = [b - a for a, b in itertools.pairwise(moved)]
    assert gaps[0] == min(gaps) and moved[-1] == even[-1]
    assert largest_gap(moved, steps) <= largest_gap(even, steps)
    if (steps, full) == (20, 3):
        assert even == [0, 7, 13] and moved == [0, 6, 13]
    if (steps, full) in ((20, 9), (20, 5)):  # already shortest first (or all gaps equal): unchanged
        assert moved == even


@pytest.mark.parametrize("warmup", [1, 2, 3])
def test_every_placement_of_the_default_rule_is_k_distinct_steps_from_step_0(warmup):
    for steps in range(1, 61):
        for full in range(1, steps + 1):
            tail = short_tail(steps, full, warmup)
            positions = full_step_positions(steps, full, warmup, 1.0, tail=tail, short_first=True)
            assert positions == sorted(set(positions)) and len(positions) == full, (steps, full, positions)
            assert positions[:min(warmup, full)] == list(range(min(warmup, full))) and positions[-1] < steps
            if tail is not None:
                assert positions[-1] == steps - 1 - tail


def test_the_default_rule_ends_its_full_steps_one_step_before_the_last_where_it_can():
    cost = CostModel.uniform(LAYOUT, tokens=64)
    plan = budget_schedule(20, LAYOUT, 2.75, cost)  # 7 full steps: the even grid would end at step 17
    full = [i for i, s in enumerate(plan.steps) if s.is_full]
    assert full == [0, 3, 6, 9, 12, 15, 18] and plan.metadata["schedule"]["tail"] == 1
    three = budget_schedule(20, LAYOUT, 5.5, cost)  # 3 full steps: the even grid would be 0, 7, 13
    assert [i for i, s in enumerate(three.steps) if s.is_full] == [0, 6, 13]


def test_ends_gathers_full_steps_at_both_ends_of_the_run():
    even = full_step_positions(50, 15, 1, 1.0)
    ends = full_step_positions(50, 15, 1, 1.0, ends=0.3)
    assert ends == full_step_positions(50, 15, 1, 1.0, 0.3) and len(set(ends)) == 15 and ends[0] == 0
    assert full_step_positions(50, 15, 1, 1.0, ends=0.0) == even

    def gaps(p):
        return [b - a for a, b in zip(p, [*p[1:], 50])]

    middle = len(ends) // 2
    assert max(gaps(ends)[:2] + gaps(ends)[-2:]) < gaps(ends)[middle]  # shorter at the ends than in the middle
    assert max(gaps(even)) - min(gaps(even)) <= 1  # without it, even


def test_a_schedule_that_cannot_reach_the_budget_is_refused():
    cost = CostModel.uniform(LAYOUT, tokens=64)
    assert fit_ratio(20, LAYOUT, Schedule(15), 3.0, cost) is None  # 15 full steps of 20 cost more than 1/3
    skip = Schedule(4, skip=True)
    fitted = fit_ratio(20, LAYOUT, skip, cost.ratio(schedule_plan(20, LAYOUT, skip)), cost)
    assert fitted is not None and fitted[1] == 1.0


def test_a_schedule_is_never_fitted_with_more_flops_than_the_budget_gives_even_within_the_tolerance():
    # a calibration candidate with one full step more than affords: its plan recomputing nothing lands 1% over the
    # budget's FLOPs, inside the 3% tolerance, but would buy its quality with compute the default does not get
    cost = CostModel.uniform(LAYOUT, tokens=64)
    schedule = Schedule(7, warmup=1)
    nothing_recomputed = cost.ratio(schedule_plan(20, LAYOUT, schedule, 0.0))
    assert fit_ratio(20, LAYOUT, schedule, nothing_recomputed * 1.01, cost) is None
    plan, _ = fit_ratio(20, LAYOUT, schedule, nothing_recomputed * 0.99, cost)
    assert cost.ratio(plan) >= nothing_recomputed * 0.99


def test_a_budget_the_rule_cannot_reach_warns_and_its_plan_records_the_schedule_it_ran(caplog):
    cost = CostModel.uniform(LAYOUT, tokens=64)
    with caplog.at_level("WARNING", logger="dualcache_diffusers.budget"):
        plan = budget_schedule(4, LAYOUT, 10.0, cost)  # 4 steps, one of them full: at most ~4x
    assert "cannot be reached with 4 steps" in caplog.text
    assert plan.metadata["budget"]["predicted"] < 10.0 * 0.97
    recorded = plan.metadata["schedule"]  # what `dualcache calibrate` starts its search from
    rebuilt = schedule_plan(4, LAYOUT, Schedule(**recorded))
    assert recorded["skip"] and [s.skip_blocks for s in rebuilt.steps] == [s.skip_blocks for s in plan.steps]
    with caplog.at_level("WARNING", logger="dualcache_diffusers.budget"):
        caplog.clear()
        budget_schedule(20, LAYOUT, 2.5, cost)
    assert not caplog.text  # a reachable budget is silent


@pytest.mark.parametrize("value", [1, 1.0, 0.5, 11, float("nan"), float("inf"), -2])
def test_a_budget_outside_its_range_is_a_clear_error(value):
    with pytest.raises(ValueError, match=r"budget=.*\(1, 10\]"):
        check_budget(value)


@pytest.mark.parametrize("value", ["3", None, True, [3]])
def test_a_budget_that_is_no_number_is_a_type_error(value):
    with pytest.raises(TypeError, match="budget must be a number"):
        check_budget(value)


def test_budget_conflicts_with_explicit_schedule_options():
    pipe = engine_dit_pipeline(num_layers=2)
    for options in ({"interval": 4}, {"fresh_ratio": 0.2}, {"first_full_steps": 3}, {"schedule": "cycle"}):
        with pytest.raises(ValueError, match="cannot be combined with"):
            enable_dual_cache(pipe, budget=3, **options)
    with pytest.raises(ValueError, match="budget"):
        enable_dual_cache(pipe, "fora", budget=3)
    assert get_engine(pipe) is None  # nothing was attached


@pytest.mark.parametrize("budget", [2.0, 3.0])
def test_enable_with_a_budget_reaches_it_as_counted(budget):
    pipe = engine_dit_pipeline()
    with torch.inference_mode(), count_flops() as uncached:
        generate(pipe, steps=20)
    enable_dual_cache(pipe, budget=budget)
    with torch.inference_mode(), count_flops() as cached:
        generate(pipe, steps=20)
    stats = cache_stats(pipe)
    assert stats.flops_speedup == pytest.approx(budget, rel=0.03)
    plan = next(iter(get_engine(pipe).denoisers[0].plans.values()))
    assert plan.metadata["budget"]["predicted"] == pytest.approx(stats.flops_speedup, rel=1e-3)
    # the whole pipeline (VAE decode included) saves a little less than the denoiser
    whole = uncached.get_total_flops() / cached.get_total_flops()
    assert 1.0 < whole <= stats.flops_speedup * 1.001
    assert stats.flops_uncached - stats.flops == pytest.approx(
        uncached.get_total_flops() - cached.get_total_flops(), rel=0.01)
    # a second generation reuses the plan, and other step counts get their own
    generate(pipe, steps=20)
    assert cache_stats(pipe).flops_speedup == pytest.approx(stats.flops_speedup)
    generate(pipe, steps=12)
    assert cache_stats(pipe).flops_speedup == pytest.approx(budget, rel=0.05)
    disable_dual_cache(pipe)


@pytest.mark.parametrize("family", ["test_family_flux", "test_family_latte", "test_family_wan:wan21"])
def test_the_budget_is_reached_on_joint_and_video_blocks(family):
    """Flux's joint blocks recompute their text rows with every partial call; Latte's temporal blocks see frames,
    not image tokens, and have no cross-attention; Wan passes the caption to its cross-attention positionally: the
    cost model follows the engine's accounting of each, and that accounting follows the FLOP counter."""
    import importlib

    from family_harness import run

    module, _, key = family.partition(":")
    module = importlib.import_module(module)
    case = module.CASES[key] if key else module.CASE
    pipe = case.build()
    name = type(pipe.transformer).__name__
    with count_flops() as uncached:
        run(pipe, case, steps=20)
    enable_dual_cache(pipe, budget=2.5)
    with count_flops() as cached:
        run(pipe, case, steps=20)
    assert cache_stats(pipe).flops_speedup == pytest.approx(2.5, rel=0.01)
    counted = sum(uncached.get_flop_counts()[name].values()) / sum(cached.get_flop_counts()[name].values())
    assert counted == pytest.approx(cache_stats(pipe).flops_speedup, rel=1e-3)
    disable_dual_cache(pipe)


def test_calibration_plans_with_the_cost_model_the_engine_planned_with_on_a_joint_attention_model():
    """Flux's joint blocks recompute their text rows with every partial call: calibration's candidates must be fitted
    on the engine's own cost model (which knows the text rows), or its plans miss the budget (2.39x for 2.5)."""
    from family_harness import run
    from test_family_flux import CASE

    from dualcache_diffusers.adapters import find_adapter
    from dualcache_diffusers.calibrate import cost_model

    pipe = CASE.build()

    class OneCall:
        def generate(self):
            run(pipe, CASE, steps=10)

    cost, _ = cost_model(pipe, OneCall(), 2.5)
    plan = budget_schedule(10, find_adapter(pipe.transformer).layout(pipe.transformer), 2.5, cost)
    enable_dual_cache(pipe, plan=plan)
    run(pipe, CASE, steps=10)
    assert cache_stats(pipe).flops_speedup == pytest.approx(2.5, rel=0.01)
    disable_dual_cache(pipe)


def test_a_second_expert_spends_the_budget_over_the_steps_it_runs():
    """Wan 2.2 A14B hands the low-noise steps to ``transformer_2``: its plan must start with its first call, not
    with the generation, or it computes an unplanned full step there and misses the budget (2.19x for 2.5)."""
    from family_harness import run
    from test_family_wan import CASES

    case = CASES["wan22_a14b"]
    pipe = case.build()
    enable_dual_cache(pipe, budget=2.5)
    run(pipe, case, steps=12)
    second = {key: s for key, s in get_engine(pipe).last_stats.items() if key.endswith("/1")}
    assert second, "the second expert never ran"
    for stats in second.values():
        joined = 12 - len(stats.step_kinds)
        assert joined > 0 and stats.step_kinds[0] == "full"
        assert stats.flops_speedup == pytest.approx(2.5, rel=0.01)
    # budget plans are keyed by (steps, costs, window, flow): the second expert's start later
    plans = [plan for (_, _, (first, _), _), plan in get_engine(pipe).denoisers[1].plans.items() if first]
    assert plans and all(plan.metadata["first_step"] == 12 - len(stats.step_kinds) for plan in plans)
    disable_dual_cache(pipe)


@pytest.mark.parametrize(("budget", "flow"), [(2.8, False), (3.2, False), (2.857, True), (4.9, True)])
def test_the_rule_skips_the_fewest_calls_that_buy_the_full_steps_the_budget_affords(budget, flow):
    """Principle 4: floor(N / b) full steps where the rule's forecast steps alone afford fewer, paid for by skipping
    the calls nearest their last full step (outside the first gap), no more than the share allows."""
    steps, cost = 20, CostModel.uniform(LAYOUT, tokens=64)
    plan = budget_schedule(steps, LAYOUT, budget, cost, flow=flow)
    full = [i for i, s in enumerate(plan.steps) if s.is_full]
    skipped = [i for i, s in enumerate(plan.steps) if s.skip_call]
    assert affordable_full_steps(steps, budget, cost, LAYOUT) < len(full) == int(steps / budget)
    assert budget <= cost.ratio(plan) <= budget * 1.03
    share = FLOW_MAX_SKIPPED_SHARE if flow else DEFAULT_MAX_SKIPPED_SHARE
    assert 0 < len(skipped) <= share * (steps - len(full))
    assert skipped == sorted(skipped_call_steps(full, steps, len(skipped)))
    # one call fewer skipped misses the budget even recomputing no token
    schedule = Schedule(**{**plan.metadata["schedule"], "skipped_calls": len(skipped) - 1, "fresh_ratio": 0.0})
    assert cost.ratio(schedule_plan(steps, LAYOUT, schedule)) < budget
    assert all(s.forecast_order == 1 and not any(map(any, s.fractions)) for s in plan.steps if s.skip_call)


def test_skipped_calls_are_the_nearest_to_their_full_step_and_leave_the_first_gap_last():
    full = [0, 3, 7, 11, 15, 19]
    assert skipped_call_steps(full, 20, 4) == [4, 8, 12, 16]
    assert skipped_call_steps(full, 20, 9) == [4, 8, 12, 16, 5, 9, 13, 17, 6]
    assert skipped_call_steps(full, 20, 20)[-2:] == [1, 2]  # the first gap reuses step 0: its calls go last


@pytest.mark.parametrize("budget", [2.857, 3.3, 4.9])
def test_a_noise_predicting_model_skips_at_most_half_the_calls_and_a_flow_model_more(budget):
    cost = CostModel.uniform(LAYOUT, tokens=64)
    noise = budget_schedule(20, LAYOUT, budget, cost)
    flow = budget_schedule(20, LAYOUT, budget, cost, flow=True)
    assert not noise.skips_calls  # these budgets need more than half of the forecast steps skipped
    assert flow.skips_calls and sum(s.is_full for s in flow.steps) > sum(s.is_full for s in noise.steps)
    assert budget_schedule(20, LAYOUT, budget, cost, skip_calls=False, flow=True).pattern() == noise.pattern()


def test_which_schedulers_sample_a_flow():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    assert samples_flow(FlowMatchEulerDiscreteScheduler())
    assert samples_flow(DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True))
    assert not samples_flow(DPMSolverMultistepScheduler())
    assert not samples_flow(DDIMScheduler(prediction_type="v_prediction"))
    assert not samples_flow(None)


def test_a_budget_plan_that_skips_calls_runs_them_skipped_from_the_first_generation():
    """The plan is made from the costs the first call records, so that call keeps its prediction: without it the
    first skipped call found nothing to forecast from and ran in full (2.50x for 2.857 on the DiT)."""
    from diffusers import DPMSolverMultistepScheduler

    pipe = engine_dit_pipeline()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, prediction_type="flow_prediction",
                                                             use_flow_sigmas=True)
    enable_dual_cache(pipe, budget=20 / 7)
    generate(pipe, steps=20)
    stats = cache_stats(pipe)
    plan = next(iter(get_engine(pipe).denoisers[0].plans.values()))
    assert plan.skips_calls
    assert stats.flops_speedup == pytest.approx(plan.metadata["budget"]["predicted"], rel=1e-3)
    assert stats.step_kinds.count("full") == sum(s.is_full for s in plan.steps)
    # recorded as their own kind, so step patterns (bench, demo, Space: first letters) show them as S
    assert "".join(kind[0].upper() for kind in stats.step_kinds) == plan.pattern()
    disable_dual_cache(pipe)
