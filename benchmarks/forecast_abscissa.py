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

import calibration_images

from dualcache_diffusers import engine
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
    calibration_images.add_arguments(parser)
    args = parser.parse_args()
    pipe, workload, reference = calibration_images.setting(args)  # also sets the scheduler's timesteps
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
            psnr = calibration_images.cached_psnr(pipe, workload, reference, budget=budget)
            print(calibration_images.name(args), budget, kind, round(psnr, 2), flush=True)


if __name__ == "__main__":
    main()
