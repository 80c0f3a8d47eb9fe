"""Candidates at 50 DDIM steps, guidance 1.5, denoiser budget 3.178 (3x of the pipeline), on the shipped DiT.

    python benchmarks/budget_50steps.py

8 images (seeds 1000-1001 x digits 0, 3, 6, 9); PSNR dB vs uncached; prints name, engine FLOPs ratio, PSNR,
pattern. The default rule and four variants (3 leading full steps, order 2, one full step fewer, 1 leading).
"""

from __future__ import annotations

import torch

from dualcache_diffusers import metrics
from dualcache_diffusers.adapters import find_adapter
from dualcache_diffusers.api import disable_dual_cache, enable_dual_cache
from dualcache_diffusers.bench import Workload, default_conditions, load_pipeline
from dualcache_diffusers.budget import Schedule, affordable_full_steps, budget_schedule, fit_ratio
from dualcache_diffusers.calibrate import cost_model

BUDGET, STEPS = 3.178, 50


def main() -> None:
    torch.set_num_threads(1)
    pipe = load_pipeline("dit")
    workload = Workload(pipe, STEPS, [1000, 1001], default_conditions(pipe)[::3][:4], batch_size=8,
                        guidance_scale=1.5)
    reference = workload.generate()
    cost, _ = cost_model(pipe, workload, BUDGET)  # the engine's FLOPs per step, from one budget-rule generation
    layout = find_adapter(pipe.transformer).layout(pipe.transformer)
    k0 = affordable_full_steps(STEPS, BUDGET, cost, layout)

    def evaluate(name: str, plan) -> None:
        enable_dual_cache(pipe, plan=plan)
        images = workload.generate()
        disable_dual_cache(pipe)
        pattern = "".join("F" if s.is_full else ("A" if s.skip_blocks else "C") for s in plan.steps)
        psnr = metrics.fidelity(images, reference)["psnr"]
        print(name, round(cost.ratio(plan), 3), round(psnr, 2), pattern, flush=True)

    evaluate("default", budget_schedule(STEPS, layout, BUDGET, cost))
    variants = [("warm3", Schedule(k0, warmup=3)), ("order2", Schedule(k0, order=2, warmup=3)),
                ("K-1", Schedule(k0 - 1)), ("warm1", Schedule(k0, warmup=1))]
    for name, schedule in variants:
        fitted = fit_ratio(STEPS, layout, schedule, BUDGET, cost)
        if fitted is not None:
            evaluate(f"{name} r={fitted[1]:.3f}", fitted[0])


if __name__ == "__main__":
    main()
