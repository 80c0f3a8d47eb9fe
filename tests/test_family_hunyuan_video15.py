"""HunyuanVideo 1.5 (double-stream blocks only; guider-driven two-call CFG) through the public API.

The tiny pipeline is given its prompt embeddings directly (no Qwen2.5-VL / ByT5 text encoders) and returns
latents (its tiny VAE only sets the latent shape). The pipeline's 729 zero image-embedding tokens (text-to-video)
are cut to 8: they are masked text rows every block computes, which would outweigh the 128 video tokens.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    AutoencoderKLHunyuanVideo15,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
)
from diffusers.guiders import ClassifierFreeGuidance
from family_harness import FamilyCase, check_family, check_unread_work_is_skipped

TEXT_DIM, TEXT_2_DIM, TEXT_LEN, TEXT_2_LEN = 16, 8, 6, 1


def tiny_hunyuan_video15_pipeline(seed: int = 0) -> HunyuanVideo15Pipeline:
    """128x128 pixels -> 8x8 latents (VAE factor 16, patch 1) = 64 tokens per frame, 13 frames -> 4 latent
    frames; 3 double blocks (hidden 64). The blocks must outweigh the ByT5 glyph projection, whose hidden
    width is fixed at 2048 (outside the blocks, never cached)."""
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=4, attention_head_dim=16, num_layers=3,
        num_refiner_layers=1, text_embed_dim=TEXT_DIM, text_embed_2_dim=TEXT_2_DIM, image_embed_dim=8,
        rope_axes_dim=(4, 6, 6), target_size=128, task_type="t2v",
    ).eval()
    pipe = HunyuanVideo15Pipeline(
        text_encoder=None, tokenizer=None, transformer=transformer, vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), text_encoder_2=None, tokenizer_2=None,
        guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )
    pipe.vision_num_semantic_tokens = 8
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embeds(seed: int, prefix: str = "") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(1, TEXT_LEN, dtype=torch.long)
    mask[:, -2:] = 0
    return {
        f"{prefix}prompt_embeds": torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g),
        f"{prefix}prompt_embeds_mask": mask,
        f"{prefix}prompt_embeds_2": torch.randn(1, TEXT_2_LEN, TEXT_2_DIM, generator=g),
        f"{prefix}prompt_embeds_mask_2": torch.ones(1, TEXT_2_LEN, dtype=torch.long),
    }


CASE = FamilyCase(
    "hunyuan_video15", build=tiny_hunyuan_video15_pipeline, output_type="latent", two_call_cfg=True,
    call_kwargs=dict(height=128, width=128, num_frames=13, **_embeds(1), **_embeds(2, "negative_")),
)


def test_hunyuan_video15_family_contract():
    check_family(CASE)


@pytest.mark.parametrize("options", [dict(config="duca", aggressive="reuse"), dict(budget=4)],
                         ids=["duca-aggressive-reuse", "budget=4"])
def test_hunyuan_video15_skips_the_norms_of_reused_modules(options, monkeypatch):
    """HunyuanVideo's declarations on the same blocks: one row through each norm whose readers reuse, the latents bit
    for bit those with every norm running."""
    check_unread_work_is_skipped(CASE, options, monkeypatch, functions=("layer_norm",))
