"""One or two leading full steps, at the most full steps a budget affords (evenly spaced otherwise).

    python benchmarks/budget_warmup.py dit 2.068 2.754 3.414 4.547 3.0

Budgets are denoiser FLOPs reductions (2.068 ... 4.547 are what `dualcache bench` needed on the shipped DiT
for 2x, 2.5x, 3x, 4x of the whole pipeline). 8 images (seeds 1000-1001 x digits 0, 3, 6, 9), 20 steps,
PSNR dB against uncached. Prints: model, budget, full steps K, leading full steps, PSNR, step pattern.
"""

from __future__ import annotations

import sys

import torch

from dualcache_diffusers import metrics
from dualcache_diffusers.adapters import find_adapter
from dualcache_diffusers.api import disable_dual_cache, enable_dual_cache
from dualcache_diffusers.bench import Workload, default_conditions, load_pipeline
from dualcache_diffusers.budget import Schedule, affordable_full_steps, fit_ratio
from dualcache_diffusers.calibrate import cost_model


def main() -> None:
    torch.set_num_threads(1)
    model, budgets = sys.argv[1], [float(b) for b in sys.argv[2:]]
    pipe = load_pipeline(model)
    workload = Workload(pipe, 20, [1000, 1001], default_conditions(pipe)[::3][:4], batch_size=8)
    reference = workload.generate()
    cost, _ = cost_model(pipe, workload, 2)  # the engine's FLOPs per step, from one budget-rule generation
    layout = find_adapter(pipe.transformer).layout(pipe.transformer)
    for budget in budgets:
        k = affordable_full_steps(20, budget, cost, layout)
        for warmup in (1, 2):
            plan, _ = fit_ratio(20, layout, Schedule(k, warmup=warmup), budget, cost)
            enable_dual_cache(pipe, plan=plan)
            images = workload.generate()
            disable_dual_cache(pipe)
            pattern = "".join("F" if s.is_full else "C" for s in plan.steps)
            print(model, budget, k, warmup, round(metrics.fidelity(images, reference)["psnr"], 2), pattern, flush=True)


if __name__ == "__main__":
    main()
