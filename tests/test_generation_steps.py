"""Which steps a generation runs, and which calls are one CFG branch, when the pipeline does not say.

Image-to-image and video-to-video pipelines (``strength`` < 1) start part-way through the scheduler's timesteps;
Wan 2.2 A14B hands the generation from one expert to the other at a timestep; several pipelines call the
denoiser once per CFG branch without a ``cache_context``. Each case used to miss the budget or mix the branches.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import engine_dit_pipeline, engine_pixart_pipeline
from diffusers import (
    AutoencoderKLHunyuanVideo,
    CogVideoXVideoToVideoPipeline,
    CogView4ControlPipeline,
    CogView4Transformer2DModel,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxKontextPipeline,
    HunyuanVideoImageToVideoPipeline,
    HunyuanVideoTransformer3DModel,
    WanVideoToVideoPipeline,
)
from family_harness import run
from PIL import Image
from test_family_cogvideox import _CALL as COGVIDEOX_CALL
from test_family_cogvideox import tiny_cogvideox_pipeline
from test_family_cogview4 import TEXT_DIM, TEXT_LEN
from test_family_flux import tiny_flux_pipeline, tiny_flux_vae
from test_family_hunyuan_video import _NEG as HUNYUAN_NEG
from test_family_hunyuan_video import _POS as HUNYUAN_POS
from test_family_hunyuan_video import POOLED_DIM as HUNYUAN_POOLED_DIM
from test_family_hunyuan_video import TEXT_DIM as HUNYUAN_TEXT_DIM
from test_family_wan import CASES as WAN

from dualcache_diffusers import cache_stats, disable_dual_cache, enable_dual_cache
from dualcache_diffusers.api import get_engine
from dualcache_diffusers.engine import MAX_BRANCHES

FLUX_IMG2IMG = dict(prompt="a red car", image=torch.ones(1, 3, 16, 16) * 0.3, height=16, width=16,
                    max_sequence_length=8, guidance_scale=3.5)
FLUX_TRUE_CFG = dict(negative_prompt="blurry", true_cfg_scale=2.0)


@pytest.fixture(scope="module")
def flux_img2img():
    pipe = FluxImg2ImgPipeline.from_pipe(tiny_flux_pipeline())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flux(pipe, steps: int, strength: float, **kwargs) -> np.ndarray:
    out = pipe(**FLUX_IMG2IMG, num_inference_steps=steps, strength=strength, output_type="np",
               generator=torch.Generator().manual_seed(0), **kwargs)
    return out.images


@pytest.mark.parametrize("budget", [2, 4])
def test_an_image_to_image_run_spends_the_budget_over_the_steps_it_runs(flux_img2img, budget):
    """strength=0.6 of 20 steps runs 12: planned over 20, budget=4 saved 3.28x and budget=2 1.81x."""
    enable_dual_cache(flux_img2img, budget=budget)
    try:
        _flux(flux_img2img, steps=20, strength=0.6)
        stats = cache_stats(flux_img2img)
    finally:
        disable_dual_cache(flux_img2img)
    assert len(stats.step_kinds) == 12 and stats.num_steps == 12
    assert stats.flops_speedup == pytest.approx(budget, rel=0.01)


def test_a_scheduler_without_a_step_index_is_located_by_the_timestep():
    """DDIM keeps no step_index (nor do CogVideoX's schedulers): an image-to-image loop over the last 12 of its 20
    timesteps is located by the second call's timestep (one host read per generation)."""
    pipe = engine_dit_pipeline(num_layers=3)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    enable_dual_cache(pipe, budget=3)
    labels = torch.tensor([1, 3, 1000, 1000])  # CFG: two classes, then the null class
    for _ in range(2):  # the second generation plans from the costs the first recorded
        pipe.scheduler.set_timesteps(20)
        latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        for t in pipe.scheduler.timesteps[8:]:
            out = pipe.transformer(torch.cat([latents] * 2), timestep=t.expand(4), class_labels=labels).sample
            cond, uncond = out[:, :4].chunk(2)
            latents = pipe.scheduler.step(uncond + 4 * (cond - uncond), t, latents).prev_sample
        stats = cache_stats(pipe)
        assert len(stats.step_kinds) == 12 and stats.flops_speedup == pytest.approx(3, rel=0.01)
    disable_dual_cache(pipe)


def test_a_video_to_video_run_without_a_begin_index_is_planned_from_the_scheduler():
    """Wan's video-to-video slices the timesteps itself (no ``set_begin_index``) and calls the denoiser once per
    CFG branch without a cache_context: both are read from the scheduler's step counter."""
    case = WAN["wan21"]
    pipe = WanVideoToVideoPipeline.from_pipe(case.build())
    pipe.set_progress_bar_config(disable=True)
    kwargs = {k: v for k, v in case.call_kwargs.items() if k != "num_frames"}
    video = [Image.fromarray(np.full((128, 128, 3), 40 * i, dtype=np.uint8)) for i in range(5)]

    def generate() -> torch.Tensor:
        return pipe(video=video, **kwargs, num_inference_steps=10, strength=0.6, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).frames

    stock = generate()
    enable_dual_cache(pipe, interval=1)
    torch.testing.assert_close(generate(), stock, atol=1e-6, rtol=0)
    enable_dual_cache(pipe, budget=3)
    generate()
    stats = get_engine(pipe).last_stats
    assert sorted(key.split("/")[0] for key in stats) == ["call0", "call1"]  # cond and uncond
    for branch in stats.values():
        assert len(branch.step_kinds) == 6 and branch.flops_speedup == pytest.approx(3, rel=0.01)


def _check_one_branch_each(pipe, generate) -> None:
    """``interval=1`` gives ``generate()``'s stock output exactly; ``budget=2`` saves 2x in each of two branches (the
    cond and uncond calls of each of 6 steps, told apart by their order)."""
    stock = generate()
    enable_dual_cache(pipe, interval=1)
    try:
        torch.testing.assert_close(torch.as_tensor(generate()), torch.as_tensor(stock), atol=1e-6, rtol=0)
        enable_dual_cache(pipe, budget=2)
        generate()
        stats = get_engine(pipe).last_stats
    finally:
        disable_dual_cache(pipe)
    assert sorted(key.split("/")[0] for key in stats) == ["call0", "call1"]
    for branch in stats.values():
        assert len(branch.step_kinds) == 6 and branch.flops_speedup == pytest.approx(2, rel=0.01)


@pytest.mark.parametrize("pipeline", ["img2img", "kontext"])
def test_true_cfg_without_a_cache_context_keeps_the_branches_apart(flux_img2img, pipeline):
    """Flux img2img's and Kontext's true CFG call the denoiser for cond and uncond in turn, with no cache_context:
    one branch each (before, the second call looked like a restarted generation and raised)."""
    if pipeline == "kontext":
        pipe = FluxKontextPipeline.from_pipe(flux_img2img)
        pipe.set_progress_bar_config(disable=True)
        kwargs = dict(_auto_resize=False, max_area=16 * 16)  # keep the tiny 16 x 16 size
    else:
        pipe, kwargs = flux_img2img, dict(strength=1.0)
    kwargs.update(FLUX_TRUE_CFG)

    def generate() -> np.ndarray:
        return pipe(**FLUX_IMG2IMG, num_inference_steps=6, output_type="np", **kwargs,
                    generator=torch.Generator().manual_seed(0)).images

    _check_one_branch_each(pipe, generate)


def test_a_cogvideox_video_to_video_run_is_planned_from_the_timestep():
    """CogVideoX's DDIM scheduler keeps no step_index: its video-to-video run (given latents, so no VAE is needed)
    is located by the second call's timestep and spends the budget over the 12 of 20 steps it runs."""
    pipe = CogVideoXVideoToVideoPipeline.from_pipe(tiny_cogvideox_pipeline())
    pipe.set_progress_bar_config(disable=True)
    kwargs = {k: v for k, v in COGVIDEOX_CALL.items() if k != "num_frames"}
    latents = torch.randn(1, 3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    enable_dual_cache(pipe, budget=3)
    try:
        pipe(**kwargs, latents=latents, num_inference_steps=20, strength=0.6, output_type="latent",
             generator=torch.Generator().manual_seed(0))
        stats = get_engine(pipe).last_stats
    finally:
        disable_dual_cache(pipe)
    assert sorted(stats) == ["cond_uncond/2/0"]  # CFG batched in one call (batch 2)
    for branch in stats.values():
        assert len(branch.step_kinds) == 12 and branch.flops_speedup == pytest.approx(3, rel=0.01)


def _flux_inpaint(flux_img2img):
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    return FluxInpaintPipeline.from_pipe(flux_img2img), dict(FLUX_IMG2IMG, **FLUX_TRUE_CFG, mask_image=mask,
                                                                     strength=1.0)


def _flux_controlnet(flux_img2img):
    torch.manual_seed(1)
    controlnet = FluxControlNetModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
    ).eval()
    kwargs = {k: v for k, v in FLUX_IMG2IMG.items() if k != "image"}
    return FluxControlNetPipeline.from_pipe(flux_img2img, controlnet=controlnet), dict(
        kwargs, **FLUX_TRUE_CFG, control_image=FLUX_IMG2IMG["image"])


def _cogview4_control(_):
    torch.manual_seed(0)
    transformer = CogView4Transformer2DModel(  # 8 input channels: the latents and the control image's
        patch_size=2, in_channels=8, out_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=TEXT_DIM, time_embed_dim=8, condition_dim=4, sample_size=16, rope_axes_dim=(4, 4),
    ).eval()
    pipe = CogView4ControlPipeline(
        tokenizer=None, text_encoder=None, vae=tiny_flux_vae(), transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256))
    text = torch.Generator().manual_seed(1)
    return pipe, dict(prompt_embeds=torch.randn(1, TEXT_LEN, TEXT_DIM, generator=text),
                      negative_prompt_embeds=torch.randn(1, TEXT_LEN, TEXT_DIM, generator=text), height=16, width=16,
                      guidance_scale=5.0, control_image=torch.rand(1, 3, 16, 16, generator=text))


def _hunyuan_video_i2v(_):
    torch.manual_seed(0)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=3, num_single_layers=3,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=HUNYUAN_TEXT_DIM,
        pooled_projection_dim=HUNYUAN_POOLED_DIM, rope_axes_dim=(2, 4, 4), image_condition_type="token_replace",
    ).eval()
    vae = AutoencoderKLHunyuanVideo(  # 8x spatial, 4x temporal: 64 x 64 x 5 frames -> 8 x 8 x 2 latents
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4, mid_block_add_attention=False,
    ).eval()
    pipe = HunyuanVideoImageToVideoPipeline(
        text_encoder=None, tokenizer=None, transformer=transformer, vae=vae, text_encoder_2=None, tokenizer_2=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), image_processor=None)
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return pipe, dict(image=Image.fromarray(pixels), height=64, width=64, num_frames=5, guidance_scale=1.0,
                      true_cfg_scale=4.0, prompt_embeds=HUNYUAN_POS["embeds"],
                      pooled_prompt_embeds=HUNYUAN_POS["pooled"], prompt_attention_mask=HUNYUAN_POS["mask"],
                      negative_prompt_embeds=HUNYUAN_NEG["embeds"],
                      negative_pooled_prompt_embeds=HUNYUAN_NEG["pooled"],
                      negative_prompt_attention_mask=HUNYUAN_NEG["mask"])


@pytest.mark.parametrize("build", [_flux_inpaint, _flux_controlnet, _cogview4_control, _hunyuan_video_i2v],
                         ids=["flux-inpaint", "flux-controlnet", "cogview4-control", "hunyuan-video-i2v"])
def test_more_pipelines_calling_each_branch_without_a_cache_context(flux_img2img, build):
    """Flux inpaint and ControlNet with true CFG, CogView4 Control and HunyuanVideo image-to-video with true CFG
    call the denoiser for cond and uncond in turn without a cache_context: one branch each, ``interval=1`` exactly
    stock, ``budget=2`` 2x in each branch."""
    pipe, kwargs = build(flux_img2img)
    pipe.set_progress_bar_config(disable=True)

    def generate() -> np.ndarray:
        torch.manual_seed(0)  # the VAE samples the control / masked image's latents from the global generator
        out = pipe(**kwargs, num_inference_steps=6, output_type="latent", generator=torch.Generator().manual_seed(0))
        return out.frames if hasattr(out, "frames") else out.images

    _check_one_branch_each(pipe, generate)


def test_calls_at_a_step_that_never_advances_stop_being_split(caplog):
    """A loop that never steps the scheduler: call order cannot tell branches apart, so after MAX_BRANCHES calls
    the engine stops splitting (one warning) instead of keeping a cache per call."""
    pipe = engine_pixart_pipeline(num_layers=2)
    enable_dual_cache(pipe, "fora")
    pipe.scheduler.set_timesteps(8)
    latents = torch.randn(1, 4, 16, 16)
    text = torch.randn(1, 8, pipe.transformer.config.caption_channels)
    added = {"resolution": None, "aspect_ratio": None}
    with caplog.at_level(logging.WARNING, logger="dualcache_diffusers"):
        for i in range(MAX_BRANCHES + 3):
            pipe.transformer(latents, encoder_hidden_states=text, timestep=torch.tensor([900 - 100 * i]),
                             added_cond_kwargs=added)
    branches = get_engine(pipe)._local.generation.branches
    assert len(branches) == MAX_BRANCHES + 1  # call0 .. call3, then one unsplit branch
    assert sum("caching them as one branch" in r.message for r in caplog.records) == 1
    disable_dual_cache(pipe)


def test_each_expert_spends_the_budget_over_the_steps_it_runs():
    """Wan 2.2 A14B: each expert plans over its own steps, which the pipeline's boundary_ratio decides (before,
    the high-noise expert ran the first part of a plan for the whole run: budget=2.5 gave 2.19x there)."""
    case = WAN["wan22_a14b"]
    pipe = case.build()
    pipe.register_to_config(boundary_ratio=0.6)  # 5 of 12 steps on the high-noise expert, 7 on the low-noise one
    enable_dual_cache(pipe, budget=2.5)
    run(pipe, case, steps=12)
    engine = get_engine(pipe)
    runs = {key: len(stats.step_kinds) for key, stats in engine.last_stats.items()}
    assert runs == {"cond/1/0": 5, "cond/1/1": 7, "uncond/1/0": 5, "uncond/1/1": 7}
    for stats in engine.last_stats.values():
        assert stats.step_kinds[0] == "full" and stats.flops_speedup == pytest.approx(2.5, rel=0.01)
    windows = {key[2] for den in engine.denoisers for key in den.plans if isinstance(key, tuple)}
    assert windows == {(0, 5), (5, 12)}
    assert cache_stats(pipe).flops_speedup == pytest.approx(2.5, rel=0.01)
    disable_dual_cache(pipe)
