"""`dualcache calibrate` and the benchmark's budget-driven methods, end to end on a tiny DiT."""

from __future__ import annotations

import csv
import json

import pytest

from dualcache_diffusers import cli
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
    assert len(info["search"]) > 3


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
