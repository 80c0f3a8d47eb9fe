"""Which budget schedule spends a FLOPs budget best: the candidates the default rule was chosen among.

    python benchmarks/budget_rule.py --model dit
    python benchmarks/budget_rule.py --model pixart
    python benchmarks/budget_rule.py --model dit --steps 50 --guidance 1.5 --budgets 2 3

For every budget, every :class:`dualcache_diffusers.budget.Schedule` of a small grid (full steps K = the
most the budget affords and one or two fewer; 2 or 3 leading full steps; even (warp 1) or front-loaded
(warp 1.5, 2) spacing of the rest; forecast order 1 or 2; the other steps running the blocks with
forecast outputs plus recomputed tokens, or skipping the block stack) gets the fresh ratio that brings
it to the budget (engine FLOPs) and is scored by PSNR against the uncached images of seeds 1000, 1001
x 4 digits. Prints the best eight, the worst three and the default rule's row.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from dualcache_diffusers import disable_dual_cache, enable_dual_cache, metrics
from dualcache_diffusers.adapters import find_adapter
from dualcache_diffusers.bench import Workload, default_conditions, load_pipeline
from dualcache_diffusers.budget import Schedule, affordable_full_steps, budget_schedule, fit_ratio
from dualcache_diffusers.calibrate import cost_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline(args.model)
    workload = Workload(pipe, args.steps, [1000, 1001], default_conditions(pipe)[::3][:4], batch_size=8,
                        guidance_scale=args.guidance)
    reference = workload.generate()
    cost, _ = cost_model(pipe, workload, 2)  # the engine's FLOPs per step, from one budget-rule generation
    layout = find_adapter(pipe.transformer).layout(pipe.transformer)

    def score(plan) -> float:
        enable_dual_cache(pipe, plan=plan)
        try:
            return metrics.fidelity(workload.generate(), reference)["psnr"]
        finally:
            disable_dual_cache(pipe)

    for budget in args.budgets:
        k0 = affordable_full_steps(args.steps, budget, cost, layout)
        rows = []
        for dk, warmup, warp, order, skip in itertools.product([0, -1, -2], [2, 3], [1.0, 1.5, 2.0], [1, 2],
                                                               [False, True]):
            if order == 2 and (warmup < 3 or skip):
                continue
            schedule = Schedule(k0 + dk, warmup=warmup, warp=warp, order=order, skip=skip)
            fitted = fit_ratio(args.steps, layout, schedule, budget, cost)
            if fitted is None:
                continue
            plan, ratio = fitted
            pattern = "".join("F" if s.is_full else ("A" if s.skip_blocks else "C") for s in plan.steps)
            rows.append((score(plan), schedule.describe(), ratio, cost.ratio(plan), pattern))
        rows.sort(reverse=True)
        print(f"\n{args.model}, {args.steps} steps, budget {budget:g}x (engine FLOPs): PSNR dB | schedule | "
              "fresh ratio | FLOPs ratio | pattern")
        for row in [*rows[:8], None, *rows[-3:]]:
            print("  ..." if row is None else f"  {row[0]:6.2f} | {row[1]} | {row[2]:.3f} | {row[3]:.3f}x | {row[4]}")
        default = budget_schedule(args.steps, layout, budget, cost)
        print(f"  default rule: {score(default):6.2f} dB at {cost.ratio(default):.3f}x, "
              + "".join("F" if s.is_full else ("A" if s.skip_blocks else "C") for s in default.steps))


if __name__ == "__main__":
    main()
