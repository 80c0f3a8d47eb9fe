"""Routers on models whose blocks differ: Flux (double then single stream blocks, tuple outputs), an SD3.5
MMDiT with `attn2` in its first block only and no `ff_context` in its last, and Latte (spatial and temporal
blocks interleaved, frames or positions folded into the batch). A few iterations of
training, then the exported plan must fit the model's layout, recompute rows only where the layout
allows it, run through `enable_dual_cache`, and cost what the trainer predicted.

Pipelines that call the denoiser once per CFG branch (Wan, Chroma, Lumina2, Flux with true CFG): the
calls of a step become the rows of one batched call, conditional branch first; calls that cannot be
merged are refused with what to do."""

from __future__ import annotations

import diffusers.pipelines.wan.pipeline_wan as pipeline_wan
import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler
from test_family_chroma import tiny_chroma_pipeline
from test_family_flux import tiny_flux_pipeline
from test_family_latte import tiny_latte_pipeline
from test_family_lumina2 import tiny_lumina2_pipeline
from test_family_sd3 import tiny_sd3_pipeline
from test_family_wan import tiny_wan_pipeline

from dualcache_diffusers import CachePlan, count_flops, disable_dual_cache, enable_dual_cache
from dualcache_diffusers.adapters import find_adapter
from dualcache_diffusers.config import check_plan_fits
from dualcache_diffusers.l2c import train_router
from dualcache_diffusers.l2c.data import generate_trajectories, trajectories_from_latents
from dualcache_diffusers.l2c.router import RouterSpec

STEPS = 8
CALL = dict(height=16, width=16, max_sequence_length=8)
BUILDERS = {"flux": tiny_flux_pipeline, "sd3": tiny_sd3_pipeline, "latte": tiny_latte_pipeline,
            "wan": tiny_wan_pipeline, "chroma": tiny_chroma_pipeline, "lumina2": tiny_lumina2_pipeline,
            "flux-true-cfg": tiny_flux_pipeline}
CALLS = {"flux": CALL, "sd3": CALL,
         "latte": dict(video_length=3, height=16, width=16, clean_caption=False, mask_feature=False),
         "wan": dict(height=128, width=128, num_frames=5, max_sequence_length=16, guidance_scale=4.0),
         "chroma": dict(CALL, guidance_scale=4.0),
         "lumina2": dict(height=128, width=128, max_sequence_length=16, system_prompt="", guidance_scale=4.0,
                         cfg_trunc_ratio=1.0),
         "flux-true-cfg": dict(CALL, negative_prompt="blurry", true_cfg_scale=2.0)}
# the same pipelines without guidance: one call per step, the conditional branch only
NO_CFG = {"wan": dict(guidance_scale=1.0), "chroma": dict(guidance_scale=1.0), "lumina2": dict(guidance_scale=1.0),
          "flux-true-cfg": dict(true_cfg_scale=1.0)}


@pytest.fixture
def wan_prompts():
    """Wan's prompt cleaning needs `ftfy` (not installed): the tiny tokenizer takes the prompts as they are."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline_wan, "prompt_clean", lambda text: text)
        yield


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread (conftest)


def _transformer_flops(pipe, counter) -> int:
    return sum(counter.get_flop_counts()[type(pipe.transformer).__name__].values())


def _generate(pipe, case: str) -> np.ndarray:
    out = pipe(prompt="a red car", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
               output_type="pt", **CALLS[case])
    return out[0].float().numpy()  # images, or a video pipeline's frames


def _check_plan(pipe, plan: CachePlan, kind: str, case: str) -> None:
    """The plan fits the model's layout (partial only where allowed), runs through `enable_dual_cache` and costs
    what the trainer predicted."""
    layout = find_adapter(pipe.transformer).layout(pipe.transformer)
    check_plan_fits(plan, layout)  # same blocks, modules and presence; partial only where allowed
    assert plan.block_modules == (None if layout.uniform else layout.block_modules)  # None: every block alike
    assert CachePlan.from_json(plan.to_json()).fits(layout)
    learned = [s for s in plan.steps if s.kind == "learned"]
    assert learned and any(f < 1.0 for s in learned for row in s.fractions for f in row)
    if kind == "dual":
        partial = {(b, plan.modules[m]) for s in learned for b, row in enumerate(s.fractions)
                   for m, f in enumerate(row) if 0.0 < f < 1.0}
        assert all(layout.can_partial(b, name) for b, name in partial)
    with count_flops() as counter:
        stock = _generate(pipe, case)
    uncached = _transformer_flops(pipe, counter)
    enable_dual_cache(pipe, plan=plan)
    try:
        with count_flops() as counter:
            cached = _generate(pipe, case)
    finally:
        disable_dual_cache(pipe)
    measured = _transformer_flops(pipe, counter) / uncached
    assert np.isfinite(cached).all() and not np.array_equal(cached, stock)
    assert plan.metadata["flops_fraction"] == pytest.approx(measured, rel=0.02)
    assert measured == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize(("family", "kind"), [("flux", "dual"), ("sd3", "dual"), ("latte", "dual"), ("flux", "l2c")])
def test_router_on_blocks_that_differ_fits_the_layout_and_costs_what_it_predicts(family, kind):
    pipe = BUILDERS[family]()
    assert not find_adapter(pipe.transformer).layout(pipe.transformer).uniform
    plan = train_router(pipe, num_inference_steps=STEPS, budget=0.5, kind=kind, iterations=4, num_images=2,
                        batch_size=2, pipeline_kwargs=CALLS[family])
    _check_plan(pipe, plan, kind, family)


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


@pytest.mark.parametrize("case", ["wan", "chroma", "lumina2", "flux-true-cfg"])
def test_calls_once_per_cfg_branch_become_the_rows_of_one_batched_call_cond_first(case, wan_prompts):
    pipe = BUILDERS[case]()
    model = pipe.transformer
    family = find_adapter(model).family(model)
    data = generate_trajectories(pipe, family, STEPS, 2, seed=0, pipeline_kwargs=CALLS[case])
    assert data.hidden.shape[:2] == (STEPS, 4)  # 2 images x 2 branches
    assert data.cond_rows.tolist() == [0, 1] and data.uncond_rows.tolist() == [2, 3]
    alone = generate_trajectories(pipe, family, STEPS, 2, seed=0, pipeline_kwargs={**CALLS[case], **NO_CFG[case]})
    assert alone.uncond_rows is None
    # step 0 (same prompts, same noise): the conditional rows are the guidance-free run's, the others are not
    torch.testing.assert_close(data.hidden[0, data.cond_rows], alone.hidden[0])
    torch.testing.assert_close(data.teacher[0, data.cond_rows], alone.teacher[0])
    assert not torch.allclose(data.teacher[0, data.uncond_rows], alone.teacher[0], atol=1e-4)
    # every row's teacher is the transformer's output on that row's input and conditioning, in one batched call
    last = torch.full((4,), STEPS - 1)
    hidden, kwargs = data.call_kwargs(last, torch.arange(4))
    with torch.no_grad():
        batched = model(hidden, **kwargs, return_dict=False)[0]
    torch.testing.assert_close(batched, data.teacher[STEPS - 1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("case", "kind"), [("wan", "dual"), ("chroma", "dual"), ("lumina2", "l2c"),
                                            ("flux-true-cfg", "l2c")])
def test_router_on_a_pipeline_calling_once_per_cfg_branch_costs_what_it_predicts(case, kind, wan_prompts):
    pipe = BUILDERS[case]()
    plan = train_router(pipe, num_inference_steps=STEPS, budget=0.5, kind=kind, iterations=4, num_images=2,
                        batch_size=2, pipeline_kwargs=CALLS[case])
    _check_plan(pipe, plan, kind, case)  # the cached pipeline's two calls per step each follow the plan


def test_training_from_latents_probes_the_conditioning_of_both_branches(wan_prompts):
    pipe = tiny_wan_pipeline()
    pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    prompts = ["a red car", "a cat"]
    latents = torch.randn(2, 16, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    data = trajectories_from_latents(pipe, "wan", 6, latents, prompts, [0, 3], seed=0, pipeline_kwargs=CALLS["wan"])
    assert data.hidden.shape[:2] == (6, 4)
    assert data.cond_rows.tolist() == [0, 1] and data.uncond_rows.tolist() == [2, 3]
    cond, uncond = pipe.encode_prompt(prompts, max_sequence_length=CALLS["wan"]["max_sequence_length"])
    torch.testing.assert_close(data.cond["encoder_hidden_states"][data.cond_rows], cond)
    torch.testing.assert_close(data.cond["encoder_hidden_states"][data.uncond_rows], uncond)  # the empty prompt
    for start in (0, 3):  # both rows of an image start a cycle from the same noised latent
        torch.testing.assert_close(data.hidden[start, data.cond_rows], data.hidden[start, data.uncond_rows])


@pytest.mark.parametrize(("case", "extra", "kind", "match"), [
    ("lumina2", dict(cfg_trunc_ratio=0.5), "l2c", r"varying number .*2 at steps 0-1, 1 at steps 2-3.*cfg_trunc_ratio"),
    ("sd3", dict(skip_guidance_layers=[1], skip_layer_guidance_stop=1.0), "l2c",
     r"1 at step 0, 2 at steps 1-3.*skip_guidance_layers"),
    ("wan", dict(negative_prompt_embeds=torch.zeros(2, 5, 16)), "l2c",
     r"'encoder_hidden_states' has shapes \(2, 16, 16\) and \(2, 5, 16\).*negative_prompt_embeds"),
    ("lumina2", {}, "dual", r"kind='dual'.*different lengths.*train kind='l2c'"),
])
def test_calls_that_cannot_share_one_batch_are_refused_with_what_to_do(case, extra, kind, match, wan_prompts):
    with pytest.raises((RuntimeError, ValueError), match=match):
        train_router(BUILDERS[case](), num_inference_steps=4, budget=0.6, kind=kind, iterations=1, num_images=2,
                     batch_size=1, pipeline_kwargs={**CALLS[case], **extra})
