"""Candidates at 50 DDIM steps, guidance 1.5, denoiser budget 3.178 (3x of the pipeline), on the shipped DiT.

    python benchmarks/budget_50steps.py

8 images (seeds 1000-1001 x digits 0, 3, 6, 9); PSNR dB vs uncached; prints name, engine FLOPs ratio, PSNR,
pattern. The default rule and four variants (3 leading full steps, order 2, one full step fewer, 1 leading).
"""

import torch

torch.set_num_threads(1)
from dualcache_diffusers import metrics
from dualcache_diffusers.api import disable_dual_cache, enable_dual_cache, get_engine
from dualcache_diffusers.bench import Workload, default_conditions, load_pipeline
from dualcache_diffusers.budget import CostModel, Schedule, affordable_full_steps, budget_schedule, fit_ratio

pipe = load_pipeline("dit")
w = Workload(pipe, 50, [1000, 1001], default_conditions(pipe)[::3][:4], batch_size=8, guidance_scale=1.5)
ref = w.generate()
enable_dual_cache(pipe, budget=3.178); w.generate(); den = get_engine(pipe).denoisers[0]
cost = CostModel.from_engine(list(den.costs.values())[0], den.modules); layout = den.layout
disable_dual_cache(pipe)
b = 3.178; k0 = affordable_full_steps(50, b, cost, layout)
def ev(name, plan):
    enable_dual_cache(pipe, plan=plan); x = w.generate(); disable_dual_cache(pipe)
    print(name, round(cost.ratio(plan), 3), round(metrics.fidelity(x, ref)["psnr"], 2), "".join("F" if s.is_full else ("A" if s.skip_blocks else "C") for s in plan.steps), flush=True)
ev("default", budget_schedule(50, layout, b, cost))
for name, sch in [("warm3", Schedule(k0, warmup=3)), ("order2", Schedule(k0, order=2, warmup=3)), ("K-1", Schedule(k0 - 1)), ("warm1", Schedule(k0, warmup=1))]:
    f = fit_ratio(50, layout, sch, b, cost)
    if f: ev(name + f" r={f[1]:.3f}", f[0])
