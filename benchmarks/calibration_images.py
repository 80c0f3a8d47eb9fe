"""The setting the rule experiments share (budget_warmup, budget_selection, forecast_abscissa, forecast_oracle):
a shipped model (or a saved pipeline), its calibration images and their uncached reference, one thread.

Calibration images only: seeds 1000 .. 1000 + N - 1 x the ten digits (the benchmark evaluates on seeds 0-9).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch

from dualcache_diffusers import metrics
from dualcache_diffusers.api import disable_dual_cache, enable_dual_cache
from dualcache_diffusers.bench import Workload, default_conditions, load_pipeline


def add_arguments(parser: argparse.ArgumentParser, seeds: int = 3,
                  budgets: tuple[float, ...] = (2.068, 2.754, 3.414, 4.547)) -> None:
    parser.add_argument("--model", default="dit", help="dit, pixart or a saved pipeline's directory")
    parser.add_argument("--dpm", action="store_true", help="swap the scheduler for DPM-Solver++ (multistep)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--seeds", type=int, default=seeds, help="calibration seeds 1000 .. 1000 + N - 1")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(budgets),
                        help="denoiser FLOPs reductions (what `dualcache bench` needed for 2x, 2.5x, 3x, 4x)")


def setting(args: argparse.Namespace) -> tuple[Any, Workload, np.ndarray]:
    """The pipeline, its calibration workload and the workload's uncached images."""
    torch.set_num_threads(1)
    pipe = load_pipeline(args.model)
    if args.dpm:
        from diffusers import DPMSolverMultistepScheduler

        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    seeds = list(range(1000, 1000 + args.seeds))
    workload = Workload(pipe, args.steps, seeds, default_conditions(pipe), batch_size=10 * args.seeds,
                        guidance_scale=args.guidance)
    return pipe, workload, workload.generate()


def generate_cached(pipe: Any, workload: Workload, **options: Any) -> np.ndarray:
    """The workload's images with ``enable_dual_cache(pipe, **options)``, the pipeline left as it was."""
    enable_dual_cache(pipe, **options)
    try:
        return workload.generate()
    finally:
        disable_dual_cache(pipe)


def cached_psnr(pipe: Any, workload: Workload, reference: np.ndarray, **options: Any) -> float:
    """Mean PSNR (dB) against ``reference`` of the workload generated with ``enable_dual_cache(pipe, **options)``."""
    return float(metrics.fidelity(generate_cached(pipe, workload, **options), reference)["psnr"])


def name(args: argparse.Namespace) -> str:
    return args.model + (" dpm" if args.dpm else "")
