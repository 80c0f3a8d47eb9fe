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

import calibration_images

SELECTIONS = ({}, {"selection": "forecast_error"}, {"selection": "forecast_error", "forecast_reanchor": True},
              {"selection": "random"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    calibration_images.add_arguments(parser)
    args = parser.parse_args()
    pipe, workload, reference = calibration_images.setting(args)
    for budget in args.budgets:
        for options in SELECTIONS:
            psnr = calibration_images.cached_psnr(pipe, workload, reference, budget=budget, **options)
            print(calibration_images.name(args), args.steps, budget, options or "vnorm", round(psnr, 2), flush=True)


if __name__ == "__main__":
    main()
