"""Latte (interleaved spatial / temporal block lists) through the public API."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, LattePipeline, LatteTransformer3DModel
from family_harness import FamilyCase, check_family, check_unread_work_is_skipped
from tiny_pipelines import tiny_t5_encoder, tiny_t5_tokenizer, tiny_vae


def tiny_latte_pipeline(seed: int = 0) -> LattePipeline:
    """16x16 latents, patch 2 -> 64 tokens per frame, 3 frames, 3 spatial + 3 temporal blocks."""
    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = tiny_t5_encoder(tokenizer, d_model=16, d_ff=24, num_heads=2)
    transformer = LatteTransformer3DModel(
        sample_size=16, num_layers=3, patch_size=2, num_attention_heads=2, attention_head_dim=16, in_channels=4,
        out_channels=8, caption_channels=16, cross_attention_dim=32, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, video_length=3,
    ).eval()
    pipe = LattePipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_vae(seed),
                         transformer=transformer, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASE = FamilyCase(
    "latte",
    build=tiny_latte_pipeline,
    call_kwargs=dict(prompt="a red car", video_length=3, height=16, width=16, guidance_scale=4.0,
                     clean_caption=False, mask_feature=False),
    output_type="pt",
)


def test_latte_family_contract():
    check_family(CASE)


@pytest.mark.parametrize("options", [dict(config="duca"), dict(config="duca", aggressive="reuse"), dict(budget=4)],
                         ids=["duca", "duca-aggressive-reuse", "budget=4"])
def test_latte_skips_the_norms_of_reused_modules(options, monkeypatch):
    """norm1 (for attn1 alone) and norm2 (for ff alone): one row where the module reuses, the output bit for bit
    that with every norm running."""
    check_unread_work_is_skipped(CASE, options, monkeypatch, functions=("layer_norm",))
