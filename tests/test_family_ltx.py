"""LTX-Video (packed video tokens, batched CFG under cache_context "cond_uncond") through the public API."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel
from family_harness import FamilyCase, check_family, check_partial_self_attention, check_unread_rms_norms_are_skipped
from tiny_pipelines import tiny_t5_encoder, tiny_t5_tokenizer

from dualcache_diffusers.adapters import find_adapter


def tiny_ltx_pipeline(seed: int = 0) -> LTXPipeline:
    """32x32 pixels, 5 frames -> latents 2x8x8 (VAE 4x / 4x), patch 1 -> 64 tokens per frame; 3 blocks."""
    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = tiny_t5_encoder(tokenizer, d_model=16, d_ff=24, num_heads=2)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False,
    ).eval()
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, num_layers=3, caption_channels=16, qk_norm="rms_norm_across_heads",
    ).eval()
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                       tokenizer=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# output_type="latent": the FLOP ratios are the denoising loop's (the tiny VAE decoder would dominate CPU time)
CASE = FamilyCase(
    "ltx",
    build=tiny_ltx_pipeline,
    call_kwargs=dict(prompt="a red car", negative_prompt="a blue tree", height=32, width=32, num_frames=5,
                     guidance_scale=3.0, max_sequence_length=16),
    output_type="latent",
)


def test_ltx_token_grid():
    pipe = tiny_ltx_pipeline()
    adapter = find_adapter(pipe.transformer)
    kwargs = dict(hidden_states=torch.zeros(2, 192, 8), num_frames=3, height=8, width=8)
    assert adapter.token_grid(pipe.transformer, (), kwargs) == (3, 8, 8)
    kwargs["width"] = 7  # disagrees with the packed rows: one flat axis
    assert adapter.token_grid(pipe.transformer, (), kwargs) == (1, 1, 192)


def test_ltx_family_contract():
    check_family(CASE)


def test_ltx_partial_self_attention():
    """attn1 (RoPE (B, S, D) tables): selected queries against all keys and values, the table sliced to them."""
    check_partial_self_attention(CASE.build(), CASE)


# the DuCa preset (its conservative steps reuse attn1 whole), aggressive steps that forecast every module (instead of
# skipping the stack) and a budget's plan
SKIPPING = [dict(config="duca"), dict(config="duca", aggressive="reuse"), dict(budget=4)]


@pytest.mark.parametrize("options", SKIPPING, ids=["duca", "duca-aggressive-reuse", "budget=4"])
def test_ltx_skips_the_norms_of_reused_modules(options, monkeypatch):
    """norm1 (modulated, for attn1 alone) and norm2 (for ff alone): one row where the module reuses, the latents bit
    for bit those with every norm running."""
    check_unread_rms_norms_are_skipped(CASE, options, monkeypatch)
