"""What the budget rule's skipped calls are worth (principle 4 of `dualcache_diffusers.budget`; docs/methods.md,
"Skipped calls"): at every budget where floor(N / b) full steps fit only by skipping calls, the rule without
skipped calls (K full steps, tokens) against the rule paying for floor(N / b) full steps with the fewest skipped
calls, whatever share of the other steps that takes. Calibration images (seeds 1000+), one thread.

    python benchmarks/skipped_calls.py --model dit --results docs/results/budget/dit/results.csv
    python benchmarks/skipped_calls.py --model runs/dit-flow --budgets 2.854 4.973
    python benchmarks/skipped_calls.py --model dit --dpm --results docs/results/budget/dit_dpm/results.csv --plans-only

Prints per budget: K without and with skipped calls, how many of the other steps skip their call, the mean PSNR
dB of both plans and the step pattern of the second (S = a skipped call). With ``--plans-only``: whether the
default rule (its share limit, ``--flow`` for a flow-matching scheduler) makes another plan with skipped calls
than without them, per budget, from the model's cost model alone.
"""

from __future__ import annotations

import argparse
import csv
import json
from unittest import mock

import calibration_images

from dualcache_diffusers import budget
from dualcache_diffusers.adapters import find_adapter
from dualcache_diffusers.calibrate import cost_model


def bench_budgets(path: str) -> list[float]:
    """The denoiser budgets of a `dualcache bench` run's duca-budget rows."""
    with open(path, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["method"] == "duca-budget"]
    return sorted({json.loads(row["setting"])["budget"] for row in rows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    calibration_images.add_arguments(parser)
    parser.add_argument("--results", help="a bench results.csv: its duca-budget budgets instead of --budgets")
    parser.add_argument("--plans-only", action="store_true",
                        help="only say where the default rule's plan changes with skipped calls (no images scored)")
    parser.add_argument("--flow", action="store_true", help="with --plans-only: the rule's share for a flow scheduler")
    args = parser.parse_args()
    budgets = bench_budgets(args.results) if args.results else args.budgets
    pipe, workload, reference = calibration_images.setting(args)
    layout = find_adapter(pipe.transformer).layout(pipe.transformer)
    cost, _ = cost_model(pipe, workload, budgets[0])
    steps = args.steps
    if args.plans_only:
        for b in budgets:
            with_calls = budget.budget_schedule(steps, layout, b, cost, flow=args.flow).pattern()
            without = budget.budget_schedule(steps, layout, b, cost, skip_calls=False).pattern()
            print(f"b={b:.4f} " + ("the same plan" if with_calls == without else f"changed: {without} -> {with_calls}"))
        return
    for b in budgets:
        k = budget.affordable_full_steps(steps, b, cost, layout)
        paid = budget.with_skipped_calls(steps, layout, b, cost, max_share=1.0)
        if paid is None or paid.full_steps <= k:
            print(f"{calibration_images.name(args)} b={b:.3f} K={k}: floor(N / b) full steps already fit", flush=True)
            continue
        with mock.patch.object(budget, "DEFAULT_SKIP_CALLS", False):
            without = calibration_images.cached_psnr(pipe, workload, reference, budget=b)
        with mock.patch.object(budget, "DEFAULT_SKIP_CALLS", True), \
                mock.patch.object(budget, "DEFAULT_MAX_SKIPPED_SHARE", 1.0):
            skipping = calibration_images.cached_psnr(pipe, workload, reference, budget=b)
            pattern = budget.budget_schedule(steps, layout, b, cost).pattern()
        print(f"{calibration_images.name(args)} b={b:.3f} K={k}->{paid.full_steps} "
              f"skipped={paid.skipped_calls}/{steps - paid.full_steps} without {without:.2f} with {skipping:.2f} "
              f"({skipping - without:+.2f}) {pattern}", flush=True)


if __name__ == "__main__":
    main()
