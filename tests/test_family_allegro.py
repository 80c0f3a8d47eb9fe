"""Allegro (batched CFG without a cache_context, 3D RoPE in self-attention) through the public API."""

from __future__ import annotations

import pytest
import torch
from diffusers import AllegroPipeline, AllegroTransformer3DModel, AutoencoderKLAllegro, DDIMScheduler
from family_harness import FamilyCase, check_family, check_unread_work_is_skipped
from tiny_pipelines import tiny_t5_encoder, tiny_t5_tokenizer


def tiny_allegro_pipeline(seed: int = 0) -> AllegroPipeline:
    """128x128 pixels, 5 frames -> latents 2x16x16 (VAE 8x / 4x), patch 2 -> 64 tokens per frame; 3 blocks."""
    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = tiny_t5_encoder(tokenizer, d_model=16, d_ff=24, num_heads=2)
    vae = AutoencoderKLAllegro(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                               norm_num_groups=2, temporal_compression_ratio=4).eval()
    transformer = AllegroTransformer3DModel(
        num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=4, num_layers=3,
        cross_attention_dim=48, sample_width=16, sample_height=16, sample_frames=3, caption_channels=16,
    ).eval()
    pipe = AllegroPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                           scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


# output_type="latent": the FLOP ratios are the denoising loop's (the tiny VAE decoder would dominate CPU time)
CASE = FamilyCase(
    "allegro",
    build=tiny_allegro_pipeline,
    call_kwargs=dict(prompt="a red car", negative_prompt="a blue tree", height=128, width=128, num_frames=5,
                     guidance_scale=4.0, max_sequence_length=16, clean_caption=False),
    output_type="latent",
)


def test_allegro_family_contract():
    check_family(CASE)


@pytest.mark.parametrize("options", [dict(config="duca"), dict(config="duca", aggressive="reuse"), dict(budget=4)],
                         ids=["duca", "duca-aggressive-reuse", "budget=4"])
def test_allegro_skips_the_norms_of_reused_modules(options, monkeypatch):
    """norm1 (for attn1 alone) and norm2 (for ff alone): one row where the module reuses, the output bit for bit
    that with every norm running."""
    check_unread_work_is_skipped(CASE, options, monkeypatch, functions=("layer_norm",))
