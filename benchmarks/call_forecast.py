"""What a step that skips the whole denoiser call would be worth (the engine has no such step yet; docs/methods.md,
"Full-step boundaries"). K full calls of N, placed as the default rule places them; every other call returns the
Lagrange extrapolation (order 0 = reuse) of the full calls' outputs over the step index, so the run costs exactly
the denoiser FLOPs of K plain steps. Scored on the benchmark's evaluation images (seeds 0 .. N-1 x 10 conditions),
PSNR against uncached, to compare with the `steps` and `duca-budget` rows of docs/results/budget/.

    python benchmarks/call_forecast.py --model dit --scheduler dpm --full-steps 4 5 7 10 --orders 0 1
    python benchmarks/call_forecast.py --model runs/dit-flow --first-seed 1000 --seeds 3 --budgets 3.294 4.973
    python benchmarks/call_forecast.py --model pixart --first-seed 1000 --seeds 3 --full-steps 4 --engine

The model is wrapped by replacing ``transformer.forward`` for the run (a measurement, not a cache: no hooks, no
FLOPs counting). Prints: K, the full steps, the mean PSNR dB per forecast order, and the default rule's
(``enable_dual_cache(pipe, budget=N/K)``, the same denoiser FLOPs, or at ``--budgets`` b with K = floor(N / b)).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from dualcache_diffusers import disable_dual_cache, enable_dual_cache, metrics
from dualcache_diffusers.adapters import find_adapter
from dualcache_diffusers.bench import Workload, default_conditions, load_pipeline
from dualcache_diffusers.budget import Schedule, full_step_positions, schedule_plan, short_tail
from dualcache_diffusers.forecast import lagrange_weights


class CallForecast:
    """``transformer.forward`` computing only the steps in ``full`` and extrapolating its output elsewhere."""

    def __init__(self, forward, full: set[int], order: int) -> None:
        self.forward, self.full, self.order = forward, full, order
        self.step, self.history = 0, []

    def __call__(self, *args, **kwargs):
        step, self.step = self.step, self.step + 1
        if step in self.full or not self.history:
            output = self.forward(*args, **kwargs)
            self.history.append((step, output[0] if isinstance(output, tuple) else output.sample))
            return output
        points = self.history[-(self.order + 1):]
        weights = lagrange_weights(tuple(s for s, _ in points), step)
        sample = sum(w * y for w, (_, y) in zip(weights, points))
        return (sample,) if kwargs.get("return_dict") is False else Transformer2DModelOutput(sample=sample)


def generate(workload: Workload, forecast: CallForecast | None) -> np.ndarray:
    pipe, original = workload.pipe, workload.pipe.transformer.forward
    images = []
    try:
        with torch.inference_mode():
            for start in range(0, len(workload.items), workload.batch_size):
                if forecast is not None:
                    forecast.step, forecast.history = 0, []
                    pipe.transformer.forward = forecast
                output = pipe(**workload.call_kwargs(workload.items[start:start + workload.batch_size]))
                images.append(np.asarray(output.images, dtype=np.float32))
    finally:
        pipe.transformer.forward = original
    return np.concatenate(images)


def mean_psnr(images: np.ndarray, reference: np.ndarray) -> float:
    return float(np.minimum(metrics.psnr(images, reference), metrics.PSNR_CAP_DB).mean())


def cached(workload: Workload, **options) -> np.ndarray:
    """The workload's images with ``enable_dual_cache(pipe, **options)``, the pipeline left as it was."""
    enable_dual_cache(workload.pipe, **options)
    try:
        return generate(workload, None)
    finally:
        disable_dual_cache(workload.pipe)


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
                        help="also the engine with the same K full steps and no token recomputed, forecasting the "
                             "block stack (skip=True) or every module (both order 1; they cost more than N / K)")
    args = parser.parse_args()

    pipe = load_pipeline(args.model)
    if args.scheduler == "dpm":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    workload = Workload(pipe, args.steps, seeds, default_conditions(pipe, 10), guidance_scale=args.guidance)
    reference = generate(workload, None)
    layout = find_adapter(pipe.transformer).layout(pipe.transformer)
    n = args.steps
    for k, budget in ([(int(n / b + 1e-9), b) for b in args.budgets] if args.budgets
                      else [(k, n / k) for k in args.full_steps]):
        full = full_step_positions(n, k, 1, 1.0, tail=short_tail(n, k), short_first=True)
        scores = []
        for order in args.orders:
            images = generate(workload, CallForecast(pipe.transformer.forward, set(full), order))
            scores.append(f"call order {order}: {mean_psnr(images, reference):.2f}")
        if args.engine:
            for skip in (True, False):
                schedule = Schedule(k, warmup=1, order=1, tail=short_tail(n, k), short_first=True, skip=skip,
                                    fresh_ratio=0.0)
                images = cached(workload, plan=schedule_plan(n, layout, schedule))
                scores.append(f"{'stack' if skip else 'modules'} order 1: {mean_psnr(images, reference):.2f}")
        images = cached(workload, budget=budget)
        scores.append(f"default rule at budget {budget:.3f}: {mean_psnr(images, reference):.2f}")
        print(f"{args.model} {type(pipe.scheduler).__name__} K={k} full {full}: " + ", ".join(scores), flush=True)


if __name__ == "__main__":
    main()
