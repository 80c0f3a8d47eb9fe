"""Sana (`SanaPipeline`: linear self-attention, cross-attention, conv MLP) through the public API.

Sana's `ff` (GLUMBConv, a 3x3 depthwise conv over the token grid) is not token-wise: DuCa and ToCa
recompute it whole or reuse it whole, never a subset of rows.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
from family_harness import FamilyCase, check_family, check_preset_cuts_flops, check_unread_work_is_skipped, run
from tiny_pipelines import tiny_gemma2_encoder, tiny_gemma_tokenizer

from dualcache_diffusers import cache_stats, count_flops, disable_dual_cache, enable_dual_cache
from dualcache_diffusers.api import get_engine

TEXT_LEN = 8


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread (conftest)


def tiny_sana_pipeline(seed: int = 0) -> SanaPipeline:
    """16x16 latents (32x32 pixels, 2-level DC-AE), patch 2 -> 64 tokens, 3 blocks, 8 caption tokens."""
    tokenizer = tiny_gemma_tokenizer(padding_side="left")
    torch.manual_seed(seed)
    text_encoder = tiny_gemma2_encoder(tokenizer)
    transformer = SanaTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=8,
        sample_size=16,
    ).eval()
    torch.manual_seed(seed)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        downsample_block_type="conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
        decoder_act_fns="silu", scaling_factor=0.41407,
    ).eval()
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASE = FamilyCase(
    "sana",
    build=tiny_sana_pipeline,
    call_kwargs=dict(prompt="a red car", height=32, width=32, guidance_scale=4.5, use_resolution_binning=False,
                     max_sequence_length=TEXT_LEN, complex_human_instruction=None),
)


def test_sana_family_contract():
    check_family(CASE)


@pytest.mark.parametrize("preset", ["duca", "toca"])
def test_sana_partial_linear_attention_flops_match_the_counter(preset):
    """attn1 (linear attention) recomputing selected queries: the engine's count agrees with FlopCounterMode
    (priced as softmax attention it was 4% (DuCa) and 9% (ToCa) low)."""
    pipe = tiny_sana_pipeline()
    with count_flops() as counter:
        run(pipe, CASE)
    uncached = counter.get_total_flops()
    case = replace(CASE, overrides={preset: dict(self_attention="partial")})
    check_preset_cuts_flops(pipe, case, preset, uncached)
    enable_dual_cache(pipe, preset, self_attention="partial")
    try:
        run(pipe, CASE, steps=6)
        stats = cache_stats(pipe)
    finally:
        disable_dual_cache(pipe)
    assert 0 < stats.tokens_computed["attn1"] < stats.tokens_total["attn1"]
    per_call = stats.tokens_total["attn1"] // stats.num_calls
    assert stats.tokens_computed["attn1"] % per_call != 0  # some steps recomputed a subset of rows


@pytest.mark.parametrize("preset", ["duca", "toca"])
def test_sana_conv_mlp_is_computed_or_reused_whole(preset):
    """Partial steps recompute selected rows of attn2 but run ff whole (or reuse it)."""
    pipe = tiny_sana_pipeline()
    enable_dual_cache(pipe, preset)
    try:
        run(pipe, CASE)
        stats = cache_stats(pipe)
        [den] = get_engine(pipe).denoisers
        assert den.layout.partial == {"attn1", "attn2"}  # attn1 only with self_attention="partial"
    finally:
        disable_dual_cache(pipe)
    assert "conservative" in stats.step_kinds
    # ff ran on the whole grid or not at all: its computed count is a multiple of one full call's count
    per_call = stats.tokens_total["ff"] // stats.num_calls
    assert stats.tokens_computed["ff"] % per_call == 0
    assert 0 < stats.tokens_computed["ff"] < stats.tokens_total["ff"]
    # attn1 computed at full steps only; attn2 also recomputed selected rows at conservative steps
    assert stats.tokens_computed["attn2"] > stats.tokens_computed["attn1"]


# the DuCa preset (its conservative steps reuse attn1 whole), aggressive steps that forecast every module (instead of
# skipping the stack) and a budget's plan
SKIPPING = [dict(config="duca"), dict(config="duca", aggressive="reuse"), dict(budget=4)]


@pytest.mark.parametrize("options", SKIPPING, ids=["duca", "duca-aggressive-reuse", "budget=4"])
def test_sana_skips_the_self_attention_norm_where_attn1_reuses(options, monkeypatch):
    """norm1 (modulated, for attn1 alone): one row where attn1 reuses, the images bit for bit those with every norm
    running. (norm2, for ff alone, is not skipped: the block unflattens its rows to the token grid.)"""
    check_unread_work_is_skipped(CASE, options, monkeypatch, functions=("layer_norm",))
