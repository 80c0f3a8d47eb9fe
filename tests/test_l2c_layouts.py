"""Routers on models whose blocks differ: Flux (double then single stream blocks, tuple outputs) and an
SD3.5 MMDiT with `attn2` in its first block only and no `ff_context` in its last. A few iterations of
training, then the exported plan must fit the model's layout, recompute rows only where the layout
allows it, run through `enable_dual_cache`, and cost what the trainer predicted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_family_flux import tiny_flux_pipeline
from test_family_sd3 import tiny_sd3_pipeline

from dualcache_diffusers import CachePlan, count_flops, disable_dual_cache, enable_dual_cache
from dualcache_diffusers.adapters import find_adapter
from dualcache_diffusers.config import check_plan_fits
from dualcache_diffusers.l2c import train_router
from dualcache_diffusers.l2c.router import RouterSpec

STEPS = 8
CALL = dict(height=16, width=16, max_sequence_length=8)
BUILDERS = {"flux": tiny_flux_pipeline, "sd3": tiny_sd3_pipeline}


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _transformer_flops(pipe, counter) -> int:
    return sum(counter.get_flop_counts()[type(pipe.transformer).__name__].values())


def _generate(pipe) -> np.ndarray:
    return pipe(prompt="a red car", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                output_type="np", **CALL).images


@pytest.mark.parametrize(("family", "kind"), [("flux", "dual"), ("sd3", "dual"), ("flux", "l2c")])
def test_router_on_blocks_that_differ_fits_the_layout_and_costs_what_it_predicts(family, kind):
    pipe = BUILDERS[family]()
    layout = find_adapter(pipe.transformer).layout(pipe.transformer)
    assert not layout.uniform
    plan = train_router(pipe, num_inference_steps=STEPS, budget=0.5, kind=kind, iterations=4, num_images=2,
                        batch_size=2, pipeline_kwargs=CALL)
    check_plan_fits(plan, layout)  # same blocks, modules and presence; partial only where allowed
    assert plan.block_modules == layout.block_modules
    assert CachePlan.from_json(plan.to_json()).fits(layout)
    learned = [s for s in plan.steps if s.kind == "learned"]
    assert learned and any(f < 1.0 for s in learned for row in s.fractions for f in row)
    if kind == "dual":
        partial = {(b, plan.modules[m]) for s in learned for b, row in enumerate(s.fractions)
                   for m, f in enumerate(row) if 0.0 < f < 1.0}
        assert all(layout.can_partial(b, name) for b, name in partial)
    with count_flops() as counter:
        stock = _generate(pipe)
    uncached = _transformer_flops(pipe, counter)
    enable_dual_cache(pipe, plan=plan)
    try:
        with count_flops() as counter:
            cached = _generate(pipe)
    finally:
        disable_dual_cache(pipe)
    measured = _transformer_flops(pipe, counter) / uncached
    assert np.isfinite(cached).all() and not np.array_equal(cached, stock)
    assert plan.metadata["flops_fraction"] == pytest.approx(measured, rel=0.02)
    assert measured == pytest.approx(0.5, abs=0.05)


def test_router_spec_of_a_layout_round_trips_and_masks_absent_and_whole_only_cells():
    pipe = tiny_sd3_pipeline()
    layout = find_adapter(pipe.transformer).layout(pipe.transformer)
    spec = RouterSpec.from_layout("dual", STEPS, layout, interval=3)
    assert RouterSpec.from_dict(spec.to_dict()) == spec
    present, partial = spec.present, spec.partial
    attn2, ff, ff_context = (layout.modules.index(n) for n in ("attn2", "ff", "ff_context"))
    assert present[0, attn2] and not present[1, attn2]  # SD3.5: attn2 in block 0 only
    assert not present[-1, ff_context]  # the last block is context_pre_only
    assert partial[:, ff].all() and not partial[:, attn2].any() and not partial[:, ff_context].any()
    # a uniform model's spec keeps the old form, so earlier checkpoints resume
    dit = RouterSpec.from_layout("dual", STEPS, _uniform_layout(), interval=3)
    assert set(dit.to_dict()) == {"kind", "num_steps", "num_blocks", "modules", "interval", "partial_ratio"}


def _uniform_layout():
    from dualcache_diffusers.plan import PlanLayout

    return PlanLayout.uniform_layout(4, ("attn1", "attn2", "ff"), partial_self_attention=True)
