"""Routers on models whose blocks differ: Flux (double then single stream blocks, tuple outputs), an SD3.5
MMDiT with `attn2` in its first block only and no `ff_context` in its last, and Latte (spatial and temporal
blocks interleaved, frames or positions folded into the batch). A few iterations of
training, then the exported plan must fit the model's layout, recompute rows only where the layout
allows it, run through `enable_dual_cache`, and cost what the trainer predicted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_family_flux import tiny_flux_pipeline
from test_family_latte import tiny_latte_pipeline
from test_family_sd3 import tiny_sd3_pipeline

from dualcache_diffusers import CachePlan, count_flops, disable_dual_cache, enable_dual_cache
from dualcache_diffusers.adapters import find_adapter
from dualcache_diffusers.config import check_plan_fits
from dualcache_diffusers.l2c import train_router
from dualcache_diffusers.l2c.router import RouterSpec

STEPS = 8
CALL = dict(height=16, width=16, max_sequence_length=8)
BUILDERS = {"flux": tiny_flux_pipeline, "sd3": tiny_sd3_pipeline, "latte": tiny_latte_pipeline}
CALLS = {"flux": CALL, "sd3": CALL,
         "latte": dict(video_length=3, height=16, width=16, clean_caption=False, mask_feature=False)}


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _transformer_flops(pipe, counter) -> int:
    return sum(counter.get_flop_counts()[type(pipe.transformer).__name__].values())


def _generate(pipe, family: str) -> np.ndarray:
    out = pipe(prompt="a red car", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
               output_type="pt", **CALLS[family])
    images = out.frames if family == "latte" else out.images
    return images.float().numpy()


@pytest.mark.parametrize(("family", "kind"), [("flux", "dual"), ("sd3", "dual"), ("latte", "dual"), ("flux", "l2c")])
def test_router_on_blocks_that_differ_fits_the_layout_and_costs_what_it_predicts(family, kind):
    pipe = BUILDERS[family]()
    layout = find_adapter(pipe.transformer).layout(pipe.transformer)
    assert not layout.uniform
    plan = train_router(pipe, num_inference_steps=STEPS, budget=0.5, kind=kind, iterations=4, num_images=2,
                        batch_size=2, pipeline_kwargs=CALLS[family])
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
        stock = _generate(pipe, family)
    uncached = _transformer_flops(pipe, counter)
    enable_dual_cache(pipe, plan=plan)
    try:
        with count_flops() as counter:
            cached = _generate(pipe, family)
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


def test_a_pipeline_calling_the_denoiser_once_per_cfg_branch_gets_a_clear_error():
    pipe = tiny_flux_pipeline()
    true_cfg = dict(CALL, negative_prompt="blurry", true_cfg_scale=2.0)
    with pytest.raises(RuntimeError, match="once per CFG branch"):
        train_router(pipe, num_inference_steps=4, budget=0.6, iterations=1, num_images=1, batch_size=1,
                     pipeline_kwargs=true_cfg)
