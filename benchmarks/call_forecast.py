"""What steps that skip the whole denoiser call are worth (``StepPlan.skip_call``; no rule places them yet:
docs/methods.md, "Full-step boundaries"). K full calls of N, placed as the default rule places them; every other
call is skipped and returns the Lagrange extrapolation (order 0 = reuse) of the full calls' predictions over the
step index, so the run costs exactly the denoiser FLOPs of K plain steps. Scored against uncached (PSNR dB) on the
benchmark's evaluation images (seeds 0 .. N-1 x 10 conditions) or, with ``--first-seed 1000``, on calibration
images, to compare with the `steps` and `duca-budget` rows of docs/results/budget/.

    python benchmarks/call_forecast.py --model dit --scheduler dpm --full-steps 4 5 7 10 --orders 0 1
    python benchmarks/call_forecast.py --model runs/dit-flow --first-seed 1000 --seeds 3 --budgets 3.294 4.973
    python benchmarks/call_forecast.py --model pixart --first-seed 1000 --seeds 3 --full-steps 4 --engine

Prints: K, the full steps, the mean PSNR dB per forecast order, and the default rule's (``enable_dual_cache(pipe,
budget=N/K)``, the same denoiser FLOPs, or at ``--budgets`` b with K = floor(N / b)).
"""

from __future__ import annotations

import argparse
import dataclasses

import calibration_images
from diffusers import DPMSolverMultistepScheduler

from dualcache_diffusers import CachePlan
from dualcache_diffusers.adapters import find_adapter
from dualcache_diffusers.bench import Workload, default_conditions, load_pipeline
from dualcache_diffusers.budget import Schedule, schedule_plan, short_tail
from dualcache_diffusers.plan import PlanLayout


def rule_grid_plan(n: int, layout: PlanLayout, k: int, order: int, other: str) -> CachePlan:
    """K full steps of ``n`` where the default rule puts them; the others skip the call (``other="call"``),
    skip the block stack ("stack") or forecast every module ("modules"), recomputing no token."""
    schedule = Schedule(k, warmup=1, order=order, tail=short_tail(n, k), short_first=True, skip=other != "modules",
                        fresh_ratio=0.0)
    plan = schedule_plan(n, layout, schedule)
    if other == "call":
        plan.steps = [dataclasses.replace(s, skip_blocks=False, skip_call=True, kind="skip") if s.skip_blocks else s
                      for s in plan.steps]
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit", help="dit, pixart or a saved pipeline's directory")
    parser.add_argument("--scheduler", choices=["saved", "dpm"], default="saved",
                        help="dpm: swap in DPMSolverMultistepScheduler (DPM-Solver++ 2M) from the saved config")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--seeds", type=int, default=10, help="seeds FIRST .. FIRST + N - 1")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="0: the benchmark's evaluation images; 1000: the calibration images")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--full-steps", type=int, nargs="+", default=[4],
                       help="K; the default rule is compared at budget N / K (which affords it K - 1 full steps)")
    group.add_argument("--budgets", type=float, nargs="+",
                       help="denoiser budgets b instead: K = floor(N / b), the default rule compared at b")
    parser.add_argument("--orders", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--engine", action="store_true",
                        help="also the same K full steps with the block stack skipped or every module forecast "
                             "(order 1, no token recomputed; they cost more than N / K)")
    args = parser.parse_args()

    pipe = load_pipeline(args.model)
    if args.scheduler == "dpm":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    workload = Workload(pipe, args.steps, seeds, default_conditions(pipe, 10), guidance_scale=args.guidance)
    reference = workload.generate()
    layout = find_adapter(pipe.transformer).layout(pipe.transformer)
    n = args.steps
    for k, budget in ([(int(n / b + 1e-9), b) for b in args.budgets] if args.budgets
                      else [(k, n / k) for k in args.full_steps]):
        def psnr(**options) -> float:
            return calibration_images.cached_psnr(pipe, workload, reference, **options)

        scores = [f"call order {order}: {psnr(plan=rule_grid_plan(n, layout, k, order, 'call')):.2f}"
                  for order in args.orders]
        scores += [f"{other} order 1: {psnr(plan=rule_grid_plan(n, layout, k, 1, other)):.2f}"
                   for other in (("stack", "modules") if args.engine else ())]
        scores.append(f"default rule at budget {budget:.3f}: {psnr(budget=budget):.2f}")
        full = [i for i, s in enumerate(rule_grid_plan(n, layout, k, 1, "call").steps) if s.is_full]
        print(f"{args.model} {type(pipe.scheduler).__name__} K={k} full {full}: " + ", ".join(scores), flush=True)


if __name__ == "__main__":
    main()
