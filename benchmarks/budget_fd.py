"""Frechet distance of the budget rule against uncached, on enough images for FD to mean something.

    python benchmarks/budget_fd.py --model dit --budgets 2 2.5 3 --seeds 10     # 10 seeds x 10 digits = 100 images

FD = Frechet distance to the real test digits in the shipped digits classifier's 64 features (lower is
better; it needs >= 100 images). Each budget is `enable_dual_cache(pipe, budget=b)`, b = the denoiser's
FLOPs reduction (the whole pipeline's is printed too). Also PSNR vs uncached.
"""

from __future__ import annotations

import argparse

import torch

from dualcache_diffusers import cache_stats, disable_dual_cache, enable_dual_cache, metrics
from dualcache_diffusers.bench import Workload, default_conditions, load_pipeline
from dualcache_diffusers.stats import count_flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.0, 2.5, 3.0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline(args.model)
    classifier = metrics.load_classifier()
    workload = Workload(pipe, args.steps, list(range(args.seeds)), default_conditions(pipe, 10), batch_size=50)
    with count_flops() as counter:
        reference = workload.generate()
    uncached = counter.get_total_flops()
    fd0 = metrics.frechet_distance_to_real(classifier, reference)
    print(f"{args.model}, {len(workload)} images, {args.steps} steps")
    print("| budget | denoiser FLOPs ratio | pipeline FLOPs ratio | PSNR dB | FD | FD / uncached FD |")
    print("|---|---|---|---|---|---|")
    print(f"| uncached | 1.00x | 1.00x | inf | {fd0:.2f} | 1.00 |")
    for budget in args.budgets:
        enable_dual_cache(pipe, budget=budget)
        with count_flops() as counter:
            images = workload.generate()
        ratio = cache_stats(pipe).flops_speedup
        disable_dual_cache(pipe)
        fd = metrics.frechet_distance_to_real(classifier, images)
        psnr = metrics.fidelity(images, reference)["psnr"]
        print(f"| {budget:g} | {ratio:.2f}x | {uncached / counter.get_total_flops():.2f}x | {psnr:.2f} | {fd:.2f} | "
              f"{fd / fd0:.2f} |", flush=True)


if __name__ == "__main__":
    main()
