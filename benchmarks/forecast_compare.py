"""Forecasts at the same schedule (so the same FLOPs): Lagrange vs learned weights vs dual forecasting.

    python benchmarks/forecast_compare.py --model dit
    python benchmarks/forecast_compare.py --model pixart

Rows, each at one schedule (so every column of a row has the same FLOPs):
  * ``fora`` (F,R,R cycles of 3) and ``duca`` (the family's preset), each with order-1 forecasts;
columns:
  * ``lagrange``: order-1 Lagrange (TaylorSeer) forecasts, V-norm selection (the preset);
  * ``learned``: the same schedule with weights fitted by ``fit_forecast_weights`` on the calibration
    seeds (``--calib-seeds``, disjoint from the evaluation seeds ``--seeds``), over ``--history`` stored
    computations;
  * ``error`` / ``error+vnorm``: conservative steps recompute the tokens whose forecast was worst at the
    last full step (``selection="forecast_error"`` / ``"forecast_error+vnorm"``), Lagrange forecasts;
  * ``... +reanchor``: the partial steps' outputs join the forecast history (``forecast_reanchor=True``);
  * ``learned, error +reanchor``: all three, the weights fitted for re-anchoring (``reanchor=True``).
PSNR in dB against the uncached images (every evaluation seed x every condition).
"""

from __future__ import annotations

import argparse

import torch

from dualcache_diffusers import cache_stats, disable_dual_cache, enable_dual_cache, metrics
from dualcache_diffusers.api import get_engine
from dualcache_diffusers.bench import Workload, default_conditions, load_pipeline
from dualcache_diffusers.forecast_fit import DEFAULT_RIDGE, fit_forecast_weights

COLUMNS = {
    "lagrange": {},
    "learned": {},
    "error": {"selection": "forecast_error"},
    "error+vnorm": {"selection": "forecast_error+vnorm"},
    "vnorm +reanchor": {"forecast_reanchor": True},
    "error +reanchor": {"selection": "forecast_error", "forecast_reanchor": True},
    "learned, error +reanchor": {"selection": "forecast_error", "forecast_reanchor": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--seeds", type=int, default=2, help="evaluation seeds 0 .. N-1")
    parser.add_argument("--calib-seeds", type=int, nargs="+", default=[100, 101])
    parser.add_argument("--history", type=int, default=None)
    parser.add_argument("--ridge", type=float, default=DEFAULT_RIDGE)
    parser.add_argument("--presets", nargs="+", default=["fora", "duca"])
    parser.add_argument("--interval", type=int, default=None, help="override the presets' interval")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline(args.model)
    conditions = default_conditions(pipe, 10)
    workload = Workload(pipe, args.steps, list(range(args.seeds)), conditions, guidance_scale=args.guidance,
                        batch_size=20)
    assert not set(args.calib_seeds) & set(workload.seeds), "calibration seeds must differ from evaluation seeds"
    reference = workload.generate()
    print("| model | steps | schedule | FLOPs | " + " | ".join(COLUMNS) + " |")
    print("|---|---|---|---|" + "---|" * len(COLUMNS))
    for preset in args.presets:
        cells, speedups = [], set()
        for column, overrides in COLUMNS.items():
            if preset == "fora" and column not in ("lagrange", "learned"):
                cells.append("")  # nothing is recomputed in part: selection and re-anchoring do not apply
                continue
            interval = {"interval": args.interval} if args.interval else {}
            enable_dual_cache(pipe, preset, forecast_order=1, **interval, **overrides)
            if column.startswith("learned"):
                plan = get_engine(pipe).denoisers[0].plan(args.steps)
                plan = fit_forecast_weights(pipe, plan, args.calib_seeds, conditions, guidance_scale=args.guidance,
                                            history=args.history, ridge=args.ridge, batch_size=20,
                                            reanchor=overrides.get("forecast_reanchor", False))
                enable_dual_cache(pipe, plan=plan, **overrides)
            images = workload.generate()
            speedups.add(round(cache_stats(pipe).flops_speedup, 3))
            disable_dual_cache(pipe)
            cells.append(f"{metrics.mean_psnr(metrics.psnr(reference, images)):.2f}")
        assert len(speedups) == 1, f"columns ran at different FLOPs: {speedups}"
        name = preset + (f" interval={args.interval}" if args.interval else "")
        print(f"| {args.model} | {args.steps} | {name} | {speedups.pop():.2f}x | " + " | ".join(cells) + " |",
              flush=True)


if __name__ == "__main__":
    main()
