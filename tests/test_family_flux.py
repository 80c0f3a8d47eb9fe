"""Flux.1 (double + single stream blocks, packed latents, true-CFG second call) through the public API."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from family_harness import (
    FamilyCase,
    check_family,
    check_partial_preset_flops,
    check_partial_self_attention,
    check_two_call_branches_are_separate,
)
from tiny_pipelines import tiny_clip_text_encoder, tiny_clip_tokenizer, tiny_t5_encoder, tiny_t5_tokenizer, tiny_vae


def tiny_flux_vae(seed: int = 0):
    vae = tiny_vae(seed)
    vae.register_to_config(shift_factor=0.0, scaling_factor=1.0)
    return vae


def tiny_flux_pipeline(seed: int = 0, num_layers: int = 3, num_single_layers: int = 3) -> FluxPipeline:
    """16x16 latents packed 2x2 -> 64 image tokens, 8 text tokens, 3 double + 3 single blocks (by default)."""
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = tiny_clip_text_encoder(tokenizer)
    text_encoder_2 = tiny_t5_encoder(tokenizer_2, num_heads=2)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
    ).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_flux_vae(seed),
                        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASE = FamilyCase(
    "flux",
    build=tiny_flux_pipeline,
    call_kwargs=dict(prompt="a red car", height=16, width=16, max_sequence_length=8, guidance_scale=3.5),
)
# true CFG: the pipeline calls the transformer twice per step, in cache_context "cond" / "uncond"
TRUE_CFG = FamilyCase(
    "flux-true-cfg",
    build=tiny_flux_pipeline,
    call_kwargs=dict(CASE.call_kwargs, negative_prompt="blurry", true_cfg_scale=2.0),
    two_call_cfg=True,
)


def test_flux_family_contract():
    check_family(CASE)


def test_flux_true_cfg_branches_are_separate():
    check_two_call_branches_are_separate(TRUE_CFG.build(), TRUE_CFG)


@pytest.mark.parametrize("blocks", ["transformer_blocks", "single_transformer_blocks"])
def test_flux_partial_joint_attention(blocks):
    """self_attention="partial": every text row plus the selected image rows recomputed, RoPE sliced to them."""
    check_partial_self_attention(CASE.build(), CASE, blocks=blocks)


def test_flux_duca_with_partial_attention_cuts_flops():
    check_partial_preset_flops(CASE, "duca")
