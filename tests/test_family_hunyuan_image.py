"""HunyuanImage 2.1 (HunyuanVideo's double + single stream blocks; guider-driven two-call CFG) through the
public API.

The tiny pipeline is given both prompt embeddings directly (no Qwen2.5-VL / ByT5 text encoders) and returns
latents (no HunyuanImage VAE): everything the cache touches runs inside the transformer.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanImagePipeline, HunyuanImageTransformer2DModel
from diffusers.guiders import ClassifierFreeGuidance
from family_harness import FamilyCase, check_family, check_partial_self_attention, check_unread_work_is_skipped

TEXT_DIM, TEXT_2_DIM, TEXT_LEN, TEXT_2_LEN = 16, 8, 6, 4


def tiny_hunyuan_image_pipeline(seed: int = 0) -> HunyuanImagePipeline:
    """256x256 pixels -> 8x8 latents (VAE factor 32, patch 1) = 64 tokens; 3 double + 3 single blocks.

    No ByT5 glyph projection (``text_embed_2_dim=None``): its fixed 2048-wide MLP would cost more than all
    blocks of this tiny model together (the pipeline still wants glyph embeddings; the model ignores them)."""
    torch.manual_seed(seed)
    transformer = HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=3,
        num_single_layers=3, num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=TEXT_DIM,
        rope_axes_dim=(4, 6),
    ).eval()
    pipe = HunyuanImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=4.0), vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=transformer,
        guider=ClassifierFreeGuidance(guidance_scale=3.5),
    )
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
    "hunyuan_image", build=tiny_hunyuan_image_pipeline, output_type="latent", two_call_cfg=True,
    call_kwargs=dict(height=256, width=256, distilled_guidance_scale=None, **_embeds(1), **_embeds(2, "negative_")),
)


def test_hunyuan_image_family_contract():
    check_family(CASE)


def test_hunyuan_image_partial_joint_attention():
    """HunyuanImageAttnProcessor computes as HunyuanVideo's: the same partial joint attention applies."""
    check_partial_self_attention(CASE.build(), CASE)


@pytest.mark.parametrize("options", [dict(config="duca", aggressive="reuse"), dict(budget=4)],
                         ids=["duca-aggressive-reuse", "budget=4"])
def test_hunyuan_image_skips_the_norms_of_reused_modules(options, monkeypatch):
    """HunyuanVideo's declarations on the same blocks: one row through each norm whose readers reuse, the latents bit
    for bit those with every norm running."""
    check_unread_work_is_skipped(CASE, options, monkeypatch, functions=("layer_norm",))
