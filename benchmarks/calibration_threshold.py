"""How many standard errors a calibration candidate's gain must clear (``calibrate(significance=...)``), judged on
held-out images: calibrate as the benchmark does (seeds 2000-2001), once per threshold, and score each plan and the
default rule on other seeds (3000 .. 3000 + N - 1 x the conditions), which neither the search nor the benchmark's
evaluation (seeds 0-9) uses.

    python benchmarks/calibration_threshold.py --model dit --budgets 2.068 2.754 3.414 4.547
    python benchmarks/calibration_threshold.py --model pixart --budgets 2.221 2.754 3.414 4.885

Budgets are denoiser FLOPs reductions (what `dualcache bench` needed for 2x, 2.5x, 3x, 4x). Prints: model, budget,
the default rule's PSNR dB on the held-out images, and each threshold's calibrated plan's gain over it.
"""

from __future__ import annotations

import argparse
import dataclasses

import calibration_images
import torch

from dualcache_diffusers.bench import Workload, calibration_workload, default_conditions, load_pipeline
from dualcache_diffusers.calibrate import calibrate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit", help="dit, pixart or a saved pipeline's directory")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--seeds", type=int, default=3, help="held-out seeds 3000 .. 3000 + N - 1")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.068, 2.754, 3.414, 4.547])
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline(args.model)
    benchmark = Workload(pipe, args.steps, list(range(10)), default_conditions(pipe), batch_size=100,
                         guidance_scale=args.guidance)
    search = calibration_workload(benchmark)  # the images `dualcache bench` calibrates on
    seeds = [3000 + i for i in range(args.seeds)]
    held_out = dataclasses.replace(benchmark, seeds=seeds, batch_size=len(seeds) * len(benchmark.conditions))
    reference = held_out.generate()
    for budget in args.budgets:
        default = calibration_images.cached_psnr(pipe, held_out, reference, budget=budget)
        gains = []
        for threshold in args.thresholds:
            plan = calibrate(pipe, search, budget, significance=threshold)
            gain = calibration_images.cached_psnr(pipe, held_out, reference, plan=plan) - default
            gains.append(f"threshold {threshold:g}: {gain:+.2f}")
        print(args.model, budget, f"default {default:.2f}", *gains, sep=" | ", flush=True)


if __name__ == "__main__":
    main()
