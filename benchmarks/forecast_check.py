"""Reuse vs forecast at the same schedule (so the same FLOPs): PSNR against the uncached images.

    python benchmarks/forecast_check.py --model dit                    # 20 DDIM steps, the pipeline's CFG
    python benchmarks/forecast_check.py --model dit --steps 50 --guidance 1.5
    python benchmarks/forecast_check.py --model dit --scheduler dpm --guidance 4
    python benchmarks/forecast_check.py --model pixart

Each setting runs twice, ``forecast_order=0`` (reuse, the published methods) and 1 and 2; the schedule
and therefore the FLOPs are the same. Images: ``--seeds`` x every digit.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import DPMSolverMultistepScheduler

from dualcache_diffusers import cache_stats, disable_dual_cache, enable_dual_cache, metrics
from dualcache_diffusers.bench import Workload, default_conditions, load_pipeline

SETTINGS = [("fora", {}), ("fora", {"interval": 4}), ("duca", {})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--scheduler", choices=["default", "dpm"], default="default")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--orders", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline(args.model)
    if args.scheduler == "dpm":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    workload = Workload(pipe, args.steps, list(range(args.seeds)), default_conditions(pipe, 10),
                        guidance_scale=args.guidance, batch_size=20)
    reference = workload.generate()
    print("| model | steps | guidance | scheduler | method | FLOPs | " + " | ".join(f"order {o}" for o in args.orders))
    for preset, overrides in SETTINGS:
        cells, speedup = [], float("nan")
        for order in args.orders:
            enable_dual_cache(pipe, preset, **overrides, forecast_order=order)
            images = workload.generate()
            speedup = cache_stats(pipe).flops_speedup
            disable_dual_cache(pipe)
            cells.append(f"{metrics.mean_psnr(metrics.psnr(reference, images)):.2f}")
        name = preset + "".join(f" {k}={v}" for k, v in overrides.items())
        print(f"| {args.model} | {args.steps} | {args.guidance or 'default'} | {args.scheduler} | {name} | "
              f"{speedup:.2f}x | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
