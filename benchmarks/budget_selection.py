"""Which tokens the default budget rule's partial steps recompute: V-norm scores (the default), the forecast error
measured at the last full step (with and without re-anchoring the recomputed rows), or random tokens.

    python benchmarks/budget_selection.py --model dit --budgets 2.068 2.754 3.414 4.547
    python benchmarks/budget_selection.py --model pixart --budgets 2.221 2.754 3.414 4.885
    python benchmarks/budget_selection.py --model dit --dpm --budgets 2.068 2.754 3.414 4.547
    python benchmarks/budget_selection.py --model dit --steps 50 --guidance 1.5 --budgets 2.068 2.563 3.178 4.233

Calibration images only (seeds 1000 .. 1000 + N - 1 x the ten digits). Prints: model, steps, budget, options,
PSNR dB vs uncached.
"""

from __future__ import annotations

import argparse

import torch

from dualcache_diffusers import metrics
from dualcache_diffusers.api import disable_dual_cache, enable_dual_cache
from dualcache_diffusers.bench import Workload, default_conditions, load_pipeline

SELECTIONS = ({}, {"selection": "forecast_error"}, {"selection": "forecast_error", "forecast_reanchor": True},
              {"selection": "random"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit")
    parser.add_argument("--dpm", action="store_true", help="swap the scheduler for DPM-Solver++ (multistep)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.068, 2.754, 3.414, 4.547])
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline(args.model)
    if args.dpm:
        from diffusers import DPMSolverMultistepScheduler

        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    seeds = list(range(1000, 1000 + args.seeds))
    workload = Workload(pipe, args.steps, seeds, default_conditions(pipe), batch_size=10 * args.seeds,
                        guidance_scale=args.guidance)
    reference = workload.generate()
    for budget in args.budgets:
        for options in SELECTIONS:
            enable_dual_cache(pipe, budget=budget, **options)
            try:
                images = workload.generate()
            finally:
                disable_dual_cache(pipe)
            psnr = metrics.fidelity(images, reference)["psnr"]
            name = args.model + (" dpm" if args.dpm else "")
            print(name, args.steps, budget, options or "vnorm", round(psnr, 2), flush=True)


if __name__ == "__main__":
    main()
