"""Which variable to extrapolate in: the step index (the engine's choice) or a noise-schedule coordinate.

The engine's order-1 forecast is linear in the step index (for the shipped schedulers' evenly spaced timesteps,
the same as linear in the timestep). Features might be smoother in the solver's own variables, so this runs the
default budget rule with the Lagrange abscissa swapped for half the log-SNR (lambda, DPM-Solver's variable),
the angle phi = arctan(sigma) or sigma = sqrt((1 - abar) / abar) at each step's timestep:

    python benchmarks/forecast_abscissa.py --model dit --budgets 2.068 2.754 3.414 4.547
    python benchmarks/forecast_abscissa.py --model dit --dpm --budgets 2.068 2.754 3.414 4.547

Calibration images only (seeds 1000 .. 1000 + N - 1 x the ten digits). Prints: model, budget, abscissa, PSNR dB.
The swap is a patch of the engine's Lagrange weights for this experiment, not an option of the library.
"""

from __future__ import annotations

import argparse
import math

import torch

from dualcache_diffusers import engine, metrics
from dualcache_diffusers.api import disable_dual_cache, enable_dual_cache
from dualcache_diffusers.bench import Workload, default_conditions, load_pipeline
from dualcache_diffusers.forecast import lagrange_weights

ABSCISSAE = ("index", "lambda", "phi", "sigma")


def coordinate(kind: str, alpha_bar: float, index: int) -> float:
    if kind == "index":
        return float(index)
    if kind == "lambda":
        return 0.5 * math.log(alpha_bar / (1 - alpha_bar))
    if kind == "phi":
        return math.atan2(math.sqrt(1 - alpha_bar), math.sqrt(alpha_bar))
    return math.sqrt((1 - alpha_bar) / alpha_bar)  # sigma


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
    reference = workload.generate()  # also sets the scheduler's timesteps for this step count
    alpha_bars = [float(pipe.scheduler.alphas_cumprod[int(t)]) for t in pipe.scheduler.timesteps]
    chosen = {"kind": "index"}

    def weights(steps, target):
        def at(i):
            return coordinate(chosen["kind"], alpha_bars[int(i)], int(i))

        return lagrange_weights([at(s) for s in steps], at(target))

    engine.lagrange_weights = weights
    for budget in args.budgets:
        for kind in ABSCISSAE:
            chosen["kind"] = kind
            enable_dual_cache(pipe, budget=budget)
            try:
                images = workload.generate()
            finally:
                disable_dual_cache(pipe)
            psnr = metrics.fidelity(images, reference)["psnr"]
            print(args.model + (" dpm" if args.dpm else ""), budget, kind, round(psnr, 2), flush=True)


if __name__ == "__main__":
    main()
