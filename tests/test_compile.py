"""torch.compile on a cached pipeline: no graph break inside the model, no recompilation once every step kind
has run, and the same images as the eager cached pipeline.

The engine takes every per-step decision in Python outside the compiled region (the denoiser hook is never
traced); the model's forward, with the block and module hooks in it, is one compiled frame that reads only
the step's actions (a few strings per block), the rows chosen for partial steps (index tensors whose
length is dynamic) and tensors. So dynamo compiles one variant per step kind and reuses them afterwards.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_pipelines import tiny_dit_pipeline
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from dualcache_diffusers import cache_stats, enable_dual_cache
from dualcache_diffusers.api import get_engine

STEPS = 7


def _generate(pipe) -> np.ndarray:
    return pipe(class_labels=[1, 2], num_inference_steps=STEPS, guidance_scale=4.0,
                generator=torch.manual_seed(0), output_type="np").images


# the DiT DuCa preset forecasts (order 1): full, conservative (partial rows) and aggressive (skipped stack)
# steps, each with and without a forecast; ToCa: full and conservative; FORA: full and reuse
@pytest.mark.parametrize("preset, options", [
    ("duca", {}),
    ("toca", {"ratio_schedule": "constant", "self_attention": "partial"}),
    ("fora", {}),
    ("duca", {"selection": "forecast_error", "forecast_reanchor": True}),  # dual forecasting: errors, anchors
    ("duca", {"budget": 2.0}),  # a budget's plan, built from the costs recorded at the first call
])
def test_compiled_cached_generation_breaks_only_outside_the_model_and_never_recompiles(preset, options):
    pipe = tiny_dit_pipeline(num_layers=1, sample_size=16)  # 64 tokens: every partial step recomputes some
    enable_dual_cache(pipe, preset, **options)
    eager = _generate(pipe)
    kinds = set(cache_stats(pipe).step_kinds)

    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounter()
    pipe.transformer.compile(backend=backend)
    try:
        first = _generate(pipe)
        graphs, unique = backend.frame_count, counters["stats"]["unique_graphs"]
        second = _generate(pipe)
    finally:
        pipe.transformer._compiled_call_impl = None
        torch._dynamo.reset()

    # one break per compiled call stack, where dynamo meets the (never traced) denoiser hook; none in a block
    breaks = counters["graph_break"]
    assert sum(breaks.values()) <= 1, dict(breaks)
    assert all("DenoiserHook.new_forward" in reason for reason in breaks), list(breaks)
    # one compiled variant of the model per step kind at most (plus, when forecasting, the same kinds before
    # the forecast has two full computations to extrapolate from), and none at all in the second generation
    assert 1 <= graphs <= 2 * len(kinds) + 1, (graphs, kinds)
    assert backend.frame_count == graphs and counters["stats"]["unique_graphs"] == unique
    np.testing.assert_allclose(first, eager, atol=1e-5)
    np.testing.assert_allclose(second, eager, atol=1e-5)


def test_interval_one_runs_stock_blocks_and_still_counts_every_flop():
    """Full steps no later step reads skip the engine's block and module work (nothing is stored after the first
    step), and the statistics still count every module as computed."""
    pipe = tiny_dit_pipeline(num_layers=2)
    stock = _generate(pipe)
    enable_dual_cache(pipe, "duca", interval=1)
    engine = get_engine(pipe)
    calls = []
    original = engine._compute
    engine._compute = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    assert np.array_equal(_generate(pipe), stock)
    stats = cache_stats(pipe)
    assert len(calls) == 4  # the first step only (2 blocks x 2 modules): it primes the caches
    assert stats.flops == stats.flops_uncached > 0
    assert stats.tokens_total and all(stats.token_fraction(m) == 1.0 for m in stats.tokens_total)
