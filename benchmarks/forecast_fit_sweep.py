"""Sensitivity of learned forecast weights to ``ridge`` and ``history`` (PSNR dB vs uncached, 20 images).

    python benchmarks/forecast_fit_sweep.py dit      # or pixart

Weights fitted on seeds 100-101, evaluated on seeds 0-1 x 10 conditions, order-1 FORA and DuCa presets.
"""

from __future__ import annotations

import sys

import torch

from dualcache_diffusers import disable_dual_cache, enable_dual_cache, metrics
from dualcache_diffusers.api import get_engine
from dualcache_diffusers.bench import Workload, default_conditions, load_pipeline
from dualcache_diffusers.forecast_fit import fit_forecast_weights


def main(model: str) -> None:
    torch.set_num_threads(1)
    pipe = load_pipeline(model)
    conditions = default_conditions(pipe, 10)
    workload = Workload(pipe, 20, [0, 1], conditions, batch_size=20)
    reference = workload.generate()
    for preset in ["fora", "duca"]:
        enable_dual_cache(pipe, preset, forecast_order=1)
        plan = get_engine(pipe).denoisers[0].plan(20)
        row = [f"lagrange {metrics.mean_psnr(metrics.psnr(reference, workload.generate())):.2f}"]
        for ridge in (0.0, 0.01, 0.1):
            for history in (None, 3):
                fitted = fit_forecast_weights(pipe, plan, [100, 101], conditions, ridge=ridge, history=history,
                                              batch_size=20)
                enable_dual_cache(pipe, plan=fitted)
                psnr = metrics.mean_psnr(metrics.psnr(reference, workload.generate()))
                row.append(f"r{ridge}/h{history or 2} {psnr:.2f}")
        disable_dual_cache(pipe)
        print(model, preset, " ".join(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "dit")
