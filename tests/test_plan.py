"""Cache plans: the published schedules, ratio schedulers, JSON round trip and summaries."""

from __future__ import annotations

import json

import pytest

from dualcache_diffusers import CachePlan, DualCacheConfig, StepPlan
from dualcache_diffusers.plan import (
    AGGRESSIVE,
    CONSERVATIVE,
    FULL,
    PlanLayout,
    cycle_step_kinds,
    dit_duca_step_kinds,
    dit_ratio,
    fora_plan,
    pixart_ratio,
)

DIT_MODULES = ("attn1", "ff")
PIXART_MODULES = ("attn1", "attn2", "ff")


def _letters(kinds: list[str]) -> str:
    return "".join({FULL: "F", CONSERVATIVE: "C", AGGRESSIVE: "A"}[k] for k in kinds)


def test_duca_cycle_of_three_is_full_conservative_aggressive():
    assert _letters(cycle_step_kinds(10, 3, "duca")) == "FCAFCAFCAF"
    assert _letters(cycle_step_kinds(8, 5, "duca")) == "FCACAFCA"
    assert _letters(cycle_step_kinds(7, 3, "toca")) == "FCCFCCF"
    assert _letters(cycle_step_kinds(7, 3, "fora")) == "FAAFAAF"


def test_leading_full_steps_then_cycles_start_from_the_last_of_them():
    assert _letters(cycle_step_kinds(8, 3, "duca", first_full=3)) == "FFFCAFCA"


def test_dit_duca_schedule_follows_the_reference_rule():
    """Hand-derived for 10 steps, threshold 3 (s counts down 9..0, N = round(3 / (1.4 - 0.8 s/10)),
    N forced to 2 for s in [2, 4)): step 0 full, s=9 -> N=4: s=8 odd->C... see the docstring of the builder."""
    kinds = dit_duca_step_kinds(10, 3)
    # s:     9  8  7  6  5  4  3  2  1  0
    # s=9 full (first step), N=round(3/0.68)=4; s=8: 8%4=0 full, N=round(3/0.76)=4; s=7: 3 odd C;
    # s=6: 2 even A; s=5: 1 C; s=4: 0 full, N=round(3/1.08)=3; s=3: 0 full, forced N=2; s=2: 0 full,
    # forced N=2; s=1: 1 C; s=0: full.
    assert _letters(kinds) == "FFCACFFFCF"


def test_dit_ratio_schedule_matches_published_factors():
    ratio = dit_ratio(0.05)
    # last step (countdown 0): step factor 3; first block layer factor 0.8; MLP x2.5
    assert ratio(19, 20, 0, 28, "mlp") == pytest.approx(0.05 * 3 * 0.8 * 2.5)
    assert ratio(19, 20, 27, 28, "mlp") == pytest.approx(min(1.0, 0.05 * 3 * 1.2 * 2.5))
    assert ratio(19, 20, 0, 28, "self_attention") == pytest.approx(0.05 * 3 * 0.8)
    # early steps (countdown >= 3/4 of the run): step factor clamps at 0
    assert ratio(0, 20, 5, 28, "mlp") == 0.0


def test_pixart_ratio_schedule_matches_published_factors():
    ratio = pixart_ratio(0.3)
    assert ratio(0, 20, 0, 28, "mlp") == pytest.approx(min(1.0, 0.3 * 1.9 * 1.6 * 1.6))
    assert ratio(10, 20, 27, 28, "cross_attention") == pytest.approx(0.3 * (1.9 - 0.9) * 0.4 * 0.6)
    assert 0.0 <= ratio(19, 20, 27, 28, "mlp") <= 1.0


def test_duca_plan_reuses_self_attention_and_skips_the_stack():
    plan = DualCacheConfig.from_preset("duca", "pixart").build_plan(
        9, PlanLayout.uniform_layout(4, PIXART_MODULES)
    )
    assert plan.kinds() == [FULL, CONSERVATIVE, AGGRESSIVE] * 3
    conservative, aggressive = plan.steps[1], plan.steps[2]
    assert all(row[0] == 0.0 for row in conservative.fractions)  # attn1 reused whole
    assert all(0.0 < row[2] <= 1.0 for row in conservative.fractions)  # ff partially recomputed
    assert aggressive.skip_blocks and aggressive.action(0, 2).value == "reuse"
    reuse_variant = DualCacheConfig.from_preset("duca", "pixart", aggressive="reuse").build_plan(
        9, PlanLayout.uniform_layout(4, PIXART_MODULES)
    )
    assert not reuse_variant.steps[2].skip_blocks
    assert all(f == 0.0 for row in reuse_variant.steps[2].fractions for f in row)


def test_partial_self_attention_option_recomputes_a_fraction_of_queries():
    plan = DualCacheConfig("toca", fresh_ratio=0.25, self_attention="partial").build_plan(
        4, PlanLayout.uniform_layout(2, DIT_MODULES)
    )
    assert plan.steps[1].fractions == [[0.25, 0.25], [0.25, 0.25]]


def test_fora_plan_reuses_every_module_between_full_steps():
    plan = fora_plan(7, 3, DIT_MODULES, interval=3)
    assert [s.is_full for s in plan.steps] == [True, False, False, True, False, False, True]
    assert not any(s.skip_blocks for s in plan.steps)
    assert plan.compute_fraction() == pytest.approx(3 / 7)


def test_interval_one_is_all_full():
    plan = DualCacheConfig("duca", interval=1).build_plan(5, PlanLayout.uniform_layout(2, DIT_MODULES))
    assert all(s.is_full for s in plan.steps)


def test_json_round_trip(tmp_path):
    plan = DualCacheConfig.from_preset("duca", "dit").build_plan(20, PlanLayout.uniform_layout(4, DIT_MODULES))
    path = tmp_path / "plan.json"
    plan.to_json(path)
    again = CachePlan.from_json(path)
    assert again.to_dict() == plan.to_dict()
    assert [s.skip_blocks for s in again.steps] == [s.skip_blocks for s in plan.steps]
    assert CachePlan.from_json(path.read_text()).kinds() == plan.kinds()
    assert json.loads(path.read_text())["format"] == "dualcache-plan"


def test_metadata_with_non_finite_numbers_round_trips(tmp_path):
    """A DPM-Solver scheduler config recorded in a plan holds lambda_min_clipped = -inf: written as a string, so
    the plan reads back (strict JSON has no infinities, and the reader refuses them)."""
    from diffusers import DPMSolverMultistepScheduler

    plan = DualCacheConfig.from_preset("duca", "dit").build_plan(20, PlanLayout.uniform_layout(4, DIT_MODULES))
    plan.metadata["scheduler"] = json.loads(DPMSolverMultistepScheduler().to_json_string())
    assert plan.metadata["scheduler"]["lambda_min_clipped"] == float("-inf")
    path = tmp_path / "plan.json"
    plan.to_json(path)
    again = CachePlan.from_json(path)
    assert again.metadata["scheduler"]["lambda_min_clipped"] == "-inf"
    assert again.kinds() == plan.kinds()


def test_summary_is_readable():
    plan = DualCacheConfig.from_preset("duca", "pixart").build_plan(6, PlanLayout.uniform_layout(2, PIXART_MODULES))
    text = plan.summary()
    assert "step pattern : FCAFCA" in text
    assert "aggressive=2" in text and "conservative=2" in text and "full=2" in text
    assert "skip block stack" in text
    assert len(text.splitlines()) == 4 + 6


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(format="other"), "not a dualcache plan"),
        (lambda d: d["steps"].pop(), "steps"),
        (lambda d: d["steps"][1]["fractions"][0].__setitem__(0, 1.5), "outside"),
        (lambda d: d["steps"][0]["fractions"][0].__setitem__(0, 0.0), "first step"),
        (lambda d: d["steps"][1]["fractions"].pop(), "blocks"),
    ],
)
def test_invalid_plans_are_rejected(mutate, message):
    data = fora_plan(4, 2, DIT_MODULES).to_dict()
    mutate(data)
    with pytest.raises(ValueError, match=message):
        CachePlan.from_dict(data)


def test_missing_plan_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CachePlan.from_json(tmp_path / "nope.json")


def test_step_plan_action_symbols():
    step = StepPlan("custom", [[1.0, 0.5, 0.0]])
    assert [step.action(0, m).symbol for m in range(3)] == ["C", "P", "R"]


def test_toca_pixart_ratio_uses_the_ratio_scheduler_not_the_interval_one():
    from dualcache_diffusers.plan import pixart_toca_ratio

    ratio = pixart_toca_ratio(0.1)
    # first step, first block, cross-attention: 0.1 x 1.9 (step) x 1.6 (layer) x 0.6 (module)
    assert ratio(0, 20, 0, 28, "cross_attention") == pytest.approx(0.1 * 1.9 * 1.6 * 0.6)
    assert ratio(0, 20, 0, 28, "mlp") > ratio(19, 20, 0, 28, "mlp")  # decreasing over the run


def test_a_placed_plan_is_full_outside_its_steps_and_keeps_its_own():
    plan = fora_plan(6, 2, ("attn", "mlp"), interval=3)
    assert plan.placed(0, 6) is plan
    later = plan.placed(4, 10)
    assert later.num_steps == 10 and (later.metadata["first_step"], later.metadata["last_step"]) == (4, 9)
    assert [s.is_full for s in later.steps[:4]] == [True] * 4
    assert later.steps[4:] == plan.steps
    early = plan.placed(0, 9)  # a first expert: its steps, then the other expert's
    assert early.steps[:6] == plan.steps and all(s.is_full for s in early.steps[6:])
    with pytest.raises(ValueError, match="cannot start at step 5 of 10"):
        plan.placed(5, 10)


