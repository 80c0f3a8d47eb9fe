"""One, two or three leading full steps under the default budget rule (the same K full steps, the rest evenly
spaced, the fresh ratio fitted to the budget); or, with ``--ratio-schedules``, one leading full step and the
given token schedules (how the recomputed fraction varies over steps and layers); or, with ``--warps``, one
leading full step and the rest placed with these warps (< 1: gaps shrinking towards the end of the run); or,
with ``--tails``, one leading full step, DuCa's token schedule and the grid ending this many forecast steps
before the end of the run (``even``: where the even grid ends; ``rule``: what the default rule picks).

    python benchmarks/budget_warmup.py --model dit --budgets 2.068 2.754 3.414 4.547
    python benchmarks/budget_warmup.py --model pixart --budgets 2.221 2.754 3.414 4.885
    python benchmarks/budget_warmup.py --model dit --steps 50 --guidance 1.5 --budgets 2.068 2.563 3.178 4.233
    python benchmarks/budget_warmup.py --model dit --seeds 3 --ratio-schedules constant pixart dit
    python benchmarks/budget_warmup.py --model dit --seeds 3 --warps 1 0.8 0.65 --ratio-schedules constant
    python benchmarks/budget_warmup.py --model dit --seeds 3 --tails even 1 2

Budgets are denoiser FLOPs reductions (what `dualcache bench` needed for 2x, 2.5x, 3x, 4x of the whole pipeline).
Calibration images only: seeds 1000-1004 x the ten digits (50 images; ``--seeds 3``: 1000-1002, 30 images; the
benchmark evaluates on seeds 0-9). ``--dpm`` swaps the scheduler for DPM-Solver++ (the README's generalization
rows); ``--model`` also takes a saved pipeline's directory.
Prints: model, steps, budget, leading full steps, token schedule, warp, tail, engine FLOPs ratio, PSNR dB vs
uncached, step pattern.
"""

from __future__ import annotations

import argparse

import calibration_images

from dualcache_diffusers.adapters import find_adapter
from dualcache_diffusers.budget import DEFAULT_RATIO_SCHEDULE, Schedule, affordable_full_steps, fit_ratio, short_tail
from dualcache_diffusers.calibrate import cost_model
from dualcache_diffusers.plan import RATIO_SCHEDULES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    calibration_images.add_arguments(parser, seeds=5)
    parser.add_argument("--ratio-schedules", nargs="+", choices=sorted(RATIO_SCHEDULES), default=None,
                        help="compare these token schedules at one leading full step (default: compare 1-3 leading)")
    parser.add_argument("--warps", type=float, nargs="+", default=None,
                        help="compare these placements at one leading full step (with the first --ratio-schedules)")
    parser.add_argument("--tails", nargs="+", default=None,
                        help="compare these tails (forecast steps after the last full step; even, rule or a number)")
    args = parser.parse_args()
    pipe, workload, reference = calibration_images.setting(args)
    cost, _ = cost_model(pipe, workload, 2)  # the engine's FLOPs per step, from one budget-rule generation
    layout = find_adapter(pipe.transformer).layout(pipe.transformer)
    for budget in args.budgets:
        k = affordable_full_steps(args.steps, budget, cost, layout)
        if args.tails:
            tails = {"even": None, "rule": short_tail(args.steps, k)}
            variants = [(1, DEFAULT_RATIO_SCHEDULE, 1.0, tails[t] if t in tails else int(t)) for t in args.tails]
        elif args.warps:
            variants = [(1, (args.ratio_schedules or ["constant"])[0], w, None) for w in args.warps]
        elif args.ratio_schedules:
            variants = [(1, r, 1.0, None) for r in args.ratio_schedules]
        else:
            variants = [(w, "constant", 1.0, None) for w in (1, 2, 3)]
        for warmup, ratio_schedule, warp, tail in variants:
            schedule = Schedule(k, warmup=warmup, warp=warp, ratio_schedule=ratio_schedule, tail=tail)
            row = (calibration_images.name(args), args.steps, budget, warmup, ratio_schedule, warp,
                   "even" if tail is None else tail)
            fitted = fit_ratio(args.steps, layout, schedule, budget, cost)
            if fitted is None:
                print(*row, "does not reach the budget", flush=True)
                continue
            plan, _ = fitted
            psnr = calibration_images.cached_psnr(pipe, workload, reference, plan=plan)
            pattern = "".join("F" if s.is_full else ("A" if s.skip_blocks else "C") for s in plan.steps)
            print(*row, round(cost.ratio(plan), 3), round(psnr, 2), pattern, flush=True)


if __name__ == "__main__":
    main()
