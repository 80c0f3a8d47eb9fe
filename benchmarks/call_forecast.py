"""What a step that skips the whole denoiser call would be worth (the engine has no such step yet; docs/methods.md,
"Full-step boundaries"). K full calls of N, placed as the default rule places them; every other call returns the
Lagrange extrapolation (order 0 = reuse) of the full calls' outputs over the step index, so the run costs exactly
the denoiser FLOPs of K plain steps. Scored on the benchmark's evaluation images (seeds 0 .. N-1 x 10 conditions),
PSNR against uncached, to compare with the `steps` and `duca-budget` rows of docs/results/budget/.

    python benchmarks/call_forecast.py --model dit --scheduler dpm --full-steps 4
    python benchmarks/call_forecast.py --model runs/dit-flow --full-steps 4

The model is wrapped by replacing ``transformer.forward`` for the run (a measurement, not a cache: no hooks, no
FLOPs counting). Prints: K, the full steps, the mean PSNR dB per forecast order, and the default rule's
(``enable_dual_cache(pipe, budget=N/K)``, the same denoiser FLOPs).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from dualcache_diffusers import disable_dual_cache, enable_dual_cache, metrics
from dualcache_diffusers.bench import Workload, default_conditions, load_pipeline
from dualcache_diffusers.budget import full_step_positions, short_tail
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit", help="dit, pixart or a saved pipeline's directory")
    parser.add_argument("--scheduler", choices=["saved", "dpm"], default="saved",
                        help="dpm: swap in DPMSolverMultistepScheduler (DPM-Solver++ 2M) from the saved config")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--seeds", type=int, default=10, help="evaluation seeds 0 .. N-1")
    parser.add_argument("--full-steps", type=int, nargs="+", default=[4])
    parser.add_argument("--orders", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    pipe = load_pipeline(args.model)
    if args.scheduler == "dpm":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    workload = Workload(pipe, args.steps, list(range(args.seeds)), default_conditions(pipe, 10),
                        guidance_scale=args.guidance)
    reference = generate(workload, None)
    for k in args.full_steps:
        full = full_step_positions(args.steps, k, 1, 1.0, tail=short_tail(args.steps, k), short_first=True)
        scores = []
        for order in args.orders:
            images = generate(workload, CallForecast(pipe.transformer.forward, set(full), order))
            psnr = np.minimum(metrics.psnr(images, reference), metrics.PSNR_CAP_DB).mean()
            scores.append(f"order {order}: {psnr:.2f}")
        enable_dual_cache(pipe, budget=args.steps / k)  # the default rule at the same denoiser FLOPs
        try:
            images = generate(workload, None)
        finally:
            disable_dual_cache(pipe)
        psnr = np.minimum(metrics.psnr(images, reference), metrics.PSNR_CAP_DB).mean()
        scores.append(f"default rule at budget {args.steps / k:.3f}: {psnr:.2f}")
        print(f"{args.model} {type(pipe.scheduler).__name__} K={k} full {full}: " + ", ".join(scores), flush=True)


if __name__ == "__main__":
    main()
