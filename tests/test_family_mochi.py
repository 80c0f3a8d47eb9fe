"""Mochi (joint attention, last block ``context_pre_only``) through the public API.

The tiny pipeline has a real (tiny) T5 text encoder and returns latents (no Mochi VAE): everything
the cache touches runs inside the transformer.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel
from family_harness import FamilyCase, check_family, check_unread_rms_norms_are_skipped
from tiny_pipelines import tiny_t5_encoder, tiny_t5_tokenizer


def tiny_mochi_pipeline(seed: int = 0) -> MochiPipeline:
    """128x128 pixels -> 16x16 latents, patch 2 -> 64 tokens per frame; 7 frames -> 2 latent frames;
    3 blocks (the last one ``context_pre_only``)."""
    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = tiny_t5_encoder(tokenizer, d_model=16, d_ff=24, num_heads=2)
    transformer = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=3, pooled_projection_dim=16,
        in_channels=4, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4, activation_fn="swiglu",
        max_sequence_length=16,
    ).eval()
    pipe = MochiPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=None, transformer=transformer,
                         scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASE = FamilyCase(
    "mochi", build=tiny_mochi_pipeline, output_type="latent",
    call_kwargs=dict(prompt="a red car", negative_prompt="a blue tree", height=128, width=128, num_frames=7,
                     guidance_scale=4.5, max_sequence_length=16),
)


def test_mochi_family_contract():
    check_family(CASE)


# the DuCa preset (its conservative steps reuse attn1 whole), aggressive steps that forecast every module (instead of
# skipping the stack) and a budget's plan
SKIPPING = [dict(config="duca"), dict(config="duca", aggressive="reuse"), dict(budget=4)]


@pytest.mark.parametrize("options", SKIPPING, ids=["duca", "duca-aggressive-reuse", "budget=4"])
def test_mochi_skips_the_norms_of_reused_modules(options, monkeypatch):
    """norm1.norm and norm1_context.norm (video and text rows, for attn1 alone), norm3 (for ff alone) and
    norm3_context (for ff_context alone): one row where their readers reuse, the latents bit for bit those with every
    norm running (counted through diffusers' RMSNorm, which each of them runs)."""
    check_unread_rms_norms_are_skipped(CASE, options, monkeypatch)
