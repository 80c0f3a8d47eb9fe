"""torch.compile on a cached pipeline: no graph break inside the model, no recompilation once every step kind
has run, and the same images as the eager cached pipeline.

The engine takes every per-step decision in Python outside the compiled region (the denoiser hook is never
traced); the model's forward, with the block and module hooks in it, is one compiled frame that reads only
the step's actions (a few strings per block), the rows chosen for partial steps (index tensors whose
length is dynamic), the forecast weights (a tensor) and tensors. So dynamo compiles one variant per step kind
and reuses them afterwards.

The DiT runs every preset's step kinds; the other families are those whose adapters differ in structure
(Flux: double- and single-stream joint attention with RoPE; Wan: video, RoPE, one call per CFG branch;
PixArt-Sigma: cross-attention to text; SD3: joint MMDiT blocks, the last one without a text output; CogVideoX:
video latents (B, F, C, H, W), [text; video] joint attention with RoPE on the video rows only), each built by
its family test with one block of each kind.
Stock diffusers compiles each of these models without a graph break (checked by
``test_stock_pipeline_compiles_without_a_break``), so no break inside the model is allowed here either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from family_harness import FamilyCase, run
from test_family_cogvideox import CASE as COGVIDEOX
from test_family_cogvideox import tiny_cogvideox_pipeline
from test_family_flux import CASE as FLUX
from test_family_flux import tiny_flux_pipeline
from test_family_pixart_sigma import CASE as PIXART_SIGMA
from test_family_pixart_sigma import tiny_pixart_sigma_pipeline
from test_family_sd3 import CASE as SD3
from test_family_sd3 import tiny_sd3_pipeline
from test_family_wan import CASES as WAN_CASES
from test_family_wan import tiny_wan_pipeline
from tiny_pipelines import tiny_dit_pipeline
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from dualcache_diffusers import cache_stats, enable_dual_cache
from dualcache_diffusers.api import get_engine

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread (conftest)

STEPS = 7
# every preset's step kinds; DuCa forecasts from step 4 on (Flux's DuCa from step 6: there the budget plan does)
FAMILY_STEPS = 6


@dataclasses.dataclass(repr=False)
class CompiledRuns:
    first: np.ndarray
    second: np.ndarray
    graphs: int  # graphs compiled during the first generation
    graphs_after: int  # ... and after the second (the same: nothing recompiled)
    unique: int  # dynamo's own count of unique graphs, after the first generation
    unique_after: int
    breaks: dict[str, int]  # graph break reasons -> count

    def __repr__(self) -> str:  # (for assertion messages: not the outputs)
        return (f"CompiledRuns(graphs={self.graphs} then {self.graphs_after}, unique={self.unique} then "
                f"{self.unique_after}, breaks={self.breaks})")


def compiled_runs(pipe: Any, generate: Callable[[Any], np.ndarray]) -> CompiledRuns:
    """Two generations with ``pipe.transformer`` compiled (dynamo only: a CompileCounter backend runs the graphs
    eagerly, so the outputs are exactly the eager ones), then the transformer is uncompiled again."""
    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounter()
    pipe.transformer.compile(backend=backend)
    try:
        first = generate(pipe)
        graphs, unique = backend.frame_count, counters["stats"]["unique_graphs"]
        second = generate(pipe)
        return CompiledRuns(first, second, graphs, backend.frame_count, unique, counters["stats"]["unique_graphs"],
                            dict(counters["graph_break"]))
    finally:
        pipe.transformer._compiled_call_impl = None
        torch._dynamo.reset()


def check_compiled_cached_generation(pipe: Any, generate: Callable[[Any], np.ndarray], preset: str,
                                     options: dict[str, Any]) -> None:
    """The eager cached generation, then two compiled ones: breaks only at the denoiser hook, one compiled variant
    per step kind at most, none compiled in the second generation, and the eager outputs."""
    enable_dual_cache(pipe, preset, **options)
    eager = generate(pipe)
    stats = cache_stats(pipe)
    kinds = set(stats.step_kinds)
    if options.get("self_attention") == "partial":  # attention that can compute selected rows did, at some steps
        den = get_engine(pipe).denoisers[0]
        attention = [name for name, spec in den.adapter.module_specs(den.model).items()
                     if spec.role in ("self_attention", "joint_attention") and spec.can_partial]
        assert all(0 < stats.tokens_computed[name] < stats.tokens_total[name] for name in attention), stats.summary()
    runs = compiled_runs(pipe, generate)

    # one break per compiled call stack, where dynamo meets the (never traced) denoiser hook; none in a block
    assert sum(runs.breaks.values()) <= 1, runs.breaks
    assert all("DenoiserHook.new_forward" in reason for reason in runs.breaks), list(runs.breaks)
    # one compiled variant of the model per step kind at most (plus, when forecasting, the same kinds before
    # the forecast has two full computations to extrapolate from), and none at all in the second generation
    assert 1 <= runs.graphs <= 2 * len(kinds) + 1, (runs.graphs, kinds)
    assert runs.graphs_after == runs.graphs and runs.unique_after == runs.unique, runs
    np.testing.assert_allclose(runs.first, eager, atol=1e-5)
    np.testing.assert_allclose(runs.second, eager, atol=1e-5)


# ---- DiT: every kind of step ----------------------------------------------------------------------------
def _generate(pipe, steps: int = STEPS) -> np.ndarray:
    return pipe(class_labels=[1, 2], num_inference_steps=steps, guidance_scale=4.0,
                generator=torch.manual_seed(0), output_type="np").images


# the DiT DuCa preset forecasts (order 1): full, conservative (partial rows) and aggressive (skipped stack)
# steps, each with and without a forecast; ToCa: full and conservative; FORA: full and reuse
@pytest.mark.parametrize("preset, options", [
    ("duca", {}),
    ("toca", {"ratio_schedule": "constant", "self_attention": "partial"}),
    ("fora", {}),
    ("duca", {"selection": "forecast_error", "forecast_reanchor": True}),  # dual forecasting: errors, anchors
    ("duca", {"budget": 2.0}),  # a budget's plan, built from the costs recorded at the first call
    # on a CPU model, cache_device="cpu" is the model's own device: stored in place, nothing to prefetch (with
    # the offloading path's bookkeeping, loads in the compiled blocks guarded on tensor ids and recompiled)
    ("duca", {"cache_device": "cpu"}),
    # forecasts 1 to 5 steps after the last full step, each with other weights: they reach the graph as a
    # tensor (as constants, each weight tuple compiled another variant and dynamo's limit of 8 was hit)
    ("duca", {"interval": 6, "steps": 13}),
])
def test_compiled_cached_generation_breaks_only_outside_the_model_and_never_recompiles(preset, options):
    pipe = tiny_dit_pipeline(num_layers=1, sample_size=16)  # 64 tokens: every partial step recomputes some
    options = dict(options)
    steps = options.pop("steps", STEPS)
    check_compiled_cached_generation(pipe, lambda p: _generate(p, steps), preset, options)


# ---- the other families -------------------------------------------------------------------------------------
# each family test's case and call, with one block of each kind (tracing time grows with the blocks)
FAMILIES = {
    "flux": dataclasses.replace(FLUX, build=lambda: tiny_flux_pipeline(num_layers=1, num_single_layers=1)),
    "wan": dataclasses.replace(WAN_CASES["wan21"], build=lambda: tiny_wan_pipeline(num_layers=1)),
    "pixart_sigma": dataclasses.replace(PIXART_SIGMA, build=lambda: tiny_pixart_sigma_pipeline(num_layers=1)),
    # block 0 with SD3.5's attn2, block 1 the last one (context_pre_only: no text output)
    "sd3": dataclasses.replace(SD3, build=lambda: tiny_sd3_pipeline(num_layers=2)),
    "cogvideox": dataclasses.replace(COGVIDEOX, build=lambda: tiny_cogvideox_pipeline(num_layers=1)),
}
# ToCa with self_attention="partial": at its partial steps the self- and joint attention of every family but SD3
# (whose joint attention is reused whole) computes the selected rows: RoPE tables sliced to them (Flux, Wan,
# CogVideoX; partial_attention.py), or selected queries against all rows (PixArt's plain processor)
PRESETS = {"duca": ("duca", {}), "toca": ("toca", {"self_attention": "partial"}), "fora": ("fora", {}),
           "budget": ("duca", {"budget": 2.0})}


def _family_generate(case: FamilyCase) -> Callable[[Any], np.ndarray]:
    return lambda pipe: run(pipe, case, steps=FAMILY_STEPS)


@pytest.mark.parametrize("config", list(PRESETS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_compiled_family_breaks_only_outside_the_model_and_never_recompiles(family, config):
    case = FAMILIES[family]
    preset, options = PRESETS[config]
    check_compiled_cached_generation(case.build(), _family_generate(case), preset, options)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_stock_pipeline_compiles_without_a_break(family):
    """The uncached baseline: stock diffusers compiles these models without a break, so a break inside the model
    in the cached runs above would be the engine's or an adapter's, not diffusers' own."""
    case = FAMILIES[family]
    pipe = case.build()
    runs = compiled_runs(pipe, _family_generate(case))
    assert runs.breaks == {} and runs.graphs_after == runs.graphs, runs


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
