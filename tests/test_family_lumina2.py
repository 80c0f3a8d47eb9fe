"""Lumina2 (text / image refiners, then joint layers; two calls per step without a cache_context)."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
from family_harness import FamilyCase, check_family, check_unread_rms_norms_are_skipped, run
from test_family_flux import tiny_flux_vae
from tiny_pipelines import tiny_gemma2_encoder, tiny_gemma_tokenizer

from dualcache_diffusers import disable_dual_cache, enable_dual_cache
from dualcache_diffusers.api import get_engine


def tiny_lumina2_pipeline(seed: int = 0) -> Lumina2Pipeline:
    """128x128 pixels -> 16x16 latents (the pipeline's fixed factor 8), patch 2 -> 64 image tokens.

    2 + 2 refiner blocks (as the released model) and 3 joint layers."""
    tokenizer = tiny_gemma_tokenizer()
    torch.manual_seed(seed)
    text_encoder = tiny_gemma2_encoder(tokenizer, hidden=16, intermediate=24, layers=2, head_dim=8)
    transformer = Lumina2Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=3, num_refiner_layers=2,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, norm_eps=1e-5, scaling_factor=1.0,
        axes_dim_rope=(4, 6, 6), axes_lens=(64, 32, 32), cap_feat_dim=16,
    ).eval()
    pipe = Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                           vae=tiny_flux_vae(seed), text_encoder=text_encoder, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASE = FamilyCase(
    "lumina2",
    build=tiny_lumina2_pipeline,
    call_kwargs=dict(prompt="a red car", negative_prompt="a blue car", system_prompt="", height=128, width=128,
                     max_sequence_length=16, guidance_scale=4.0),
    two_call_cfg=True,
)


def test_lumina2_family_contract():
    check_family(CASE)


def test_lumina2_cfg_truncation_keeps_the_cond_branch():
    """After cfg_trunc_ratio the uncond call stops: the cond branch (the first call) keeps every step."""
    pipe = tiny_lumina2_pipeline()
    case = FamilyCase("lumina2-trunc", build=tiny_lumina2_pipeline,
                      call_kwargs=dict(CASE.call_kwargs, cfg_trunc_ratio=0.5))
    enable_dual_cache(pipe, "fora")
    try:
        run(pipe, case, steps=6)
        calls = {key: stats.num_calls for key, stats in get_engine(pipe).last_stats.items()}
    finally:
        disable_dual_cache(pipe)
    assert calls["call0/1/0"] == 6 and 0 < calls["call1/1/0"] < 6, calls


def test_lumina2_refuses_unequal_caption_lengths_in_one_batch():
    pipe = tiny_lumina2_pipeline()
    enable_dual_cache(pipe, "toca")
    try:
        with pytest.raises(ValueError, match="different lengths"):
            pipe(prompt=["a red car", "a"], system_prompt="", height=128, width=128, max_sequence_length=32,
                 guidance_scale=1.0, num_inference_steps=2, output_type="np")
    finally:
        disable_dual_cache(pipe)


def test_lumina2_feed_forward_role_is_per_block():
    """`feed_forward` is the caption's MLP in the context refiner and the image MLP in the main layers: a
    conservative step computes the first whole and recomputes selected rows of the second."""
    pipe = tiny_lumina2_pipeline()
    enable_dual_cache(pipe, "toca")
    try:
        [den] = get_engine(pipe).denoisers
        layout, plan = den.layout, den.plan(20)
    finally:
        disable_dual_cache(pipe)
    names = layout.block_names
    refiner = names.index("context_refiner.0")
    layer = names.index("layers.0")
    assert layout.role(refiner, "feed_forward") == "text_mlp" and layout.role(layer, "feed_forward") == "mlp"
    column = plan.modules.index("feed_forward")
    step = next(s for s in plan.steps if s.kind == "conservative")
    assert step.fractions[refiner][column] == 1.0
    assert 0.0 < step.fractions[layer][column] < 1.0


# the DuCa preset (its conservative steps reuse attn whole), aggressive steps that forecast every module (instead of
# skipping the stack) and a budget's plan
SKIPPING = [dict(config="duca"), dict(config="duca", aggressive="reuse"), dict(budget=4)]


@pytest.mark.parametrize("options", SKIPPING, ids=["duca", "duca-aggressive-reuse", "budget=4"])
def test_lumina2_skips_the_norms_of_reused_modules(options, monkeypatch):
    """norm1 (the context refiner's plain RMSNorm; norm1.norm, the RMSNorm in LuminaRMSNormZero, in the noise refiner
    and the main layers), for attn alone, and ffn_norm1 (for feed_forward alone): one row where their reader reuses,
    the images bit for bit those with every norm running (counted through diffusers' RMSNorm)."""
    check_unread_rms_norms_are_skipped(CASE, options, monkeypatch)
