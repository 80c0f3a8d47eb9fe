"""Where the default budget plan's error comes from, by oracles that see the true module outputs.

At every step that does not compute a module, the engine returns its forecast (partial modules: with some rows
recomputed). Each oracle computes the true output there too (extra FLOPs: an experiment, not a method) and:

* ``truth_mlp`` / ``truth_attn``: returns the truth for the MLPs / the attention modules, the forecast elsewhere;
* ``scalar``: returns ``a + s (f - a)``, the forecast ``f`` moved from the module's last stored point ``a`` by
  the per-sample factor ``s`` that best fits the truth (least squares), as a self-correcting forecast measured
  on the recomputed rows could at best do; ``channel``: the same per channel.

    python benchmarks/forecast_oracle.py --model dit --budgets 2.068 2.754

Calibration images only (seeds 1000 .. 1000 + N - 1 x the ten digits). Prints: model, budget, oracle, PSNR dB.
The oracles patch the engine for this experiment; they are not options of the library.
"""

from __future__ import annotations

import argparse

import calibration_images
import torch

from dualcache_diffusers import engine

ORACLES = ("none", "truth_mlp", "truth_attn", "scalar", "channel")


def rescaled(truth: torch.Tensor, forecast: torch.Tensor, anchor: torch.Tensor, per_channel: bool) -> torch.Tensor:
    step, target = (forecast - anchor).float(), (truth - anchor).float()
    dims = tuple(range(1, step.dim() - 1)) if per_channel else tuple(range(1, step.dim()))
    factor = (step * target).sum(dims, keepdim=True) / (step * step).sum(dims, keepdim=True).clamp_min(1e-12)
    return anchor + factor.to(forecast.dtype) * (forecast - anchor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    calibration_images.add_arguments(parser, seeds=2, budgets=(2.068, 2.754))
    args = parser.parse_args()
    pipe, workload, reference = calibration_images.setting(args)
    run_module, chosen = engine.DualCacheEngine.run_module, {"oracle": "none"}

    def oracle_run_module(self, cached, forward, call_args, call_kwargs):
        call, oracle = self.current_call(), chosen["oracle"]
        if (oracle == "none" or call is None or call.passthrough or call.block != cached.block
                or call.actions[cached.block][cached.column] == "compute"):
            return run_module(self, cached, forward, call_args, call_kwargs)
        key = (cached.block, cached.column, call.block_calls.get(cached.column, 0))
        history = engine._anchored(call.state, key)
        truth = forward(*call_args, **call_kwargs)
        output = run_module(self, cached, forward, call_args, call_kwargs)
        if not isinstance(output, torch.Tensor) or not history:
            return output
        name = cached.spec.name
        if oracle in ("truth_mlp", "truth_attn"):
            wanted = ("ff" in name or "mlp" in name) if oracle == "truth_mlp" else "attn" in name
            return truth if wanted else output
        return rescaled(truth, output, history[-1][1], per_channel=oracle == "channel")

    engine.DualCacheEngine.run_module = oracle_run_module
    for budget in args.budgets:
        for oracle in ORACLES:
            chosen["oracle"] = oracle
            psnr = calibration_images.cached_psnr(pipe, workload, reference, budget=budget)
            print(calibration_images.name(args), budget, oracle, round(psnr, 2), flush=True)


if __name__ == "__main__":
    main()
