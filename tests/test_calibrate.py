"""`dualcache calibrate` and the benchmark's budget-driven methods, end to end on a tiny DiT."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from dualcache_diffusers import cli
from dualcache_diffusers.budget import default_schedule
from dualcache_diffusers.calibrate import _candidate, _candidates, search_size, significantly_better
from dualcache_diffusers.plan import CachePlan

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread (conftest)


def test_calibrate_writes_a_plan_at_the_budget_no_worse_than_the_default_rule(dit_dir, tmp_path, capsys):
    out = tmp_path / "plan.json"
    args = ["calibrate", "--model", str(dit_dir), "--budget", "2.5", "--steps", "8", "--seeds", "5", "6",
            "--conditions", "2", "--out", str(out)]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "predicted" in printed and str(out) in printed
    plan = CachePlan.from_json(out)
    info = plan.metadata["calibration"]
    assert plan.num_steps == 8 and plan.steps[0].is_full
    assert info["budget"] == 2.5 and info["seeds"] == [5, 6]
    assert info["predicted_flops_ratio"] == pytest.approx(2.5, rel=0.03)
    assert info["psnr"] >= info["default_rule_psnr"]  # the default rule is the search's starting point
    assert len(info["search"]) >= 2 and all("gain_z" in entry for entry in info["search"][1:])  # candidates scored


def test_bench_runs_the_budget_rule_and_a_calibrated_plan_at_the_same_flops(dit_dir, tmp_path):
    out = tmp_path / "bench"
    args = ["bench", "--model", str(dit_dir), "--steps", "8", "--seeds", "1", "--budgets", "2",
            "--methods", "uncached", "duca-budget", "calibrated", "--classifier", str(tmp_path / "none"),
            "--out", str(out)]
    assert cli.main(args) == 0
    with (out / "results.csv").open() as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"uncached", "duca-budget", "calibrated"}
    budget = json.loads(rows["duca-budget"]["setting"])["budget"]
    assert json.loads(rows["calibrated"]["setting"])["budget"] == budget  # same searched budget, same FLOPs
    for name in ("duca-budget", "calibrated"):
        assert float(rows[name]["flops_ratio"]) == pytest.approx(2.0, rel=0.05)


@pytest.mark.parametrize("gain, taken", [
    ([0.3, 0.2, 0.4, 0.3, 0.25, 0.35], True),  # small but consistent
    ([3.0, -0.5, -0.4, -0.6, -0.5, -0.4], False),  # a higher mean carried by one image
    ([-0.1, -0.2, -0.1, -0.3, -0.1, -0.2], False),  # worse
    ([0.0] * 6, False),  # a tie keeps the plan already found
    ([0.1], True),  # one image: no spread to judge by
])
def test_a_candidate_replaces_the_best_plan_only_with_a_significant_paired_gain(gain, taken):
    best = np.linspace(30.0, 40.0, len(gain))  # images of different difficulty: only the paired gain counts
    assert significantly_better(best + np.array(gain), best) is taken


def test_a_candidate_with_a_broken_image_never_replaces_the_best_plan():
    from dualcache_diffusers.calibrate import image_scores

    reference = np.random.default_rng(0).random((4, 8, 8, 3))
    good = reference + 0.01
    broken = good.copy()
    broken[2, 0, 0, 0] = np.nan  # e.g. a diverging forecast in half precision
    best, candidate = image_scores(good, reference), image_scores(broken, reference)
    assert candidate[2] == -np.inf and np.isfinite(candidate[[0, 1, 3]]).all()
    assert not significantly_better(candidate, best)
    assert significantly_better(best, candidate)  # a sound plan replaces a broken one
    assert not significantly_better(candidate, candidate)  # both broken on the same image: no evidence


def test_a_knob_that_moves_the_grid_brings_the_rules_tail_for_the_new_grid():
    schedule = default_schedule(20, 7)  # 7 of 20: the rule ends the grid at step 18
    assert schedule.tail == 1
    # 6 of 20: ending at 18 would lengthen the first gap, so the rule keeps the even grid (budget.short_tail)
    assert _candidate(schedule, "full_steps", 6, 20).tail is None
    assert _candidate(schedule, "full_steps", 6, 20).full_steps == 6
    assert _candidate(schedule, "order", 2, 20).tail == 1  # other knobs leave the grid as it is
    assert _candidate(schedule, "tail", None, 20).tail is None  # and the tail knob sets it


def test_a_knob_that_moves_the_grid_is_tried_with_every_tail():
    schedule = default_schedule(20, 9)
    tails = (None, 0, 1, 2)
    tried = _candidates(schedule, "warmup", 2, 20, tails)
    assert tried[0] == _candidate(schedule, "warmup", 2, 20)  # the rule's tail for the new grid first
    assert all(s.warmup == 2 for s in tried) and {s.tail for s in tried} >= {0, 1, 2}
    assert len({s.tail for s in tried}) == len(tried)  # no schedule twice
    assert _candidates(schedule, "order", 2, 20, tails) == [_candidate(schedule, "order", 2, 20)]


def _search(monkeypatch, space, default_scores, scores_of, steps=20, budget=2.2):
    """Run :func:`calibrate` on a uniform toy cost model: the default rule's plan scores ``default_scores`` (one
    PSNR per calibration image), a candidate ``scores_of(its schedule)``; returns the plan and the progress updates."""
    from dualcache_diffusers import calibrate as calibration
    from dualcache_diffusers.budget import CostModel, budget_schedule
    from dualcache_diffusers.plan import PlanLayout

    layout = PlanLayout.uniform_layout(2, ("attn1", "ff"))
    reference = np.zeros((len(default_scores), 4, 4, 3))

    class Workload:
        seeds, conditions, guidance_scale = (1,), (0,), None

        def generate(self):
            return reference

        def __len__(self):
            return len(reference)

    class Progress:
        updates = 0

        def update(self, n=1):
            Progress.updates += n

        def set_postfix_str(self, text):
            pass

    workload = Workload()
    workload.steps = steps
    cost = CostModel.uniform(layout)
    monkeypatch.setattr(calibration, "default_run", lambda pipe, workload, budget: (
        cost, budget_schedule(workload.steps, layout, budget, cost), reference))
    monkeypatch.setattr(calibration, "image_scores", lambda images, ref: default_scores)
    monkeypatch.setattr(calibration, "score_plan", lambda pipe, workload, plan, ref: scores_of(
        plan.metadata["schedule"]))
    monkeypatch.setattr(calibration, "_with_learned_forecast", lambda pipe, workload, best, ref: best.plan)
    monkeypatch.setattr("dualcache_diffusers.adapters.find_adapter", lambda model: type("A", (), {
        "layout": staticmethod(lambda m: layout)})())
    pipe = type("Pipe", (), {"transformer": None})()
    plan = calibration.calibrate(pipe, workload, budget, progress=Progress(), space=space)
    return plan, Progress.updates


def test_calibration_finds_leading_steps_that_win_only_with_another_tail(monkeypatch):
    """Two leading full steps that lose with the rule's tail and win with the last step full: a search moving one
    knob at a time from the default (tail first, then leading steps) reaches the pair only because a knob that moves
    the grid is tried with every tail."""
    space = {"tail": (None, 0, 1), "warmup": (1, 2)}

    def score(schedule):
        if schedule["warmup"] == 2:
            return 33.0 if schedule["tail"] == 0 else 28.0
        return 29.0 if schedule["tail"] == 0 else 30.0

    spread = np.linspace(-0.5, 0.5, 6)  # images of different difficulty
    plan, updates = _search(monkeypatch, space, 30.0 + spread, lambda schedule: score(schedule) + spread)
    assert plan.metadata["calibration"]["schedule"]["warmup"] == 2
    assert plan.metadata["calibration"]["schedule"]["tail"] == 0
    assert plan.metadata["calibration"]["psnr"] == pytest.approx(33.0)
    assert updates <= search_size(space)  # the progress bar is long enough


def test_calibration_keeps_the_default_plan_when_no_candidate_wins_significantly(monkeypatch):
    """A search whose candidates all score a higher mean than the default rule on the calibration images, each
    carried by one image, returns the default rule's plan."""
    lucky = np.array([36.0, 29.5, 29.5, 29.5, 29.5, 29.5])  # mean 30.58
    plan, _ = _search(monkeypatch, {"warmup": (1, 2), "order": (1, 2)}, np.full(6, 30.0), lambda schedule: lucky,
                      steps=10, budget=2.5)
    info = plan.metadata["calibration"]
    assert info["psnr"] == info["default_rule_psnr"] == 30.0
    assert [entry.get("taken") for entry in info["search"][1:]] == [False] * (len(info["search"]) - 1)
    assert info["schedule"]["warmup"] == 1 and info["schedule"]["order"] == 1
