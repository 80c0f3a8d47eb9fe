"""QwenImage (double-stream blocks returning (text, image), packed latents, true CFG in two calls).

The pipeline's text encoder is Qwen2.5-VL; the test passes prompt embeddings (a path the pipeline
supports) instead of building a tiny Qwen2.5-VL, and returns latents to skip the 3D VAE decode.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from family_harness import FamilyCase, check_family, check_unread_work_is_skipped


def tiny_qwenimage_pipeline(seed: int = 0) -> QwenImagePipeline:
    """64x64 pixels -> 16x16 latents, patch 2 -> 64 image tokens; 3 blocks."""
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                 latents_std=[1.0] * 4).eval()
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=3, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    ).eval()
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                             tokenizer=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


_embeds = torch.Generator().manual_seed(1)
CASE = FamilyCase(
    "qwenimage",
    build=tiny_qwenimage_pipeline,
    call_kwargs=dict(
        prompt_embeds=torch.randn(1, 7, 16, generator=_embeds), prompt_embeds_mask=torch.ones(1, 7, dtype=torch.long),
        negative_prompt_embeds=torch.randn(1, 7, 16, generator=_embeds),
        negative_prompt_embeds_mask=torch.ones(1, 7, dtype=torch.long),
        true_cfg_scale=4.0, height=64, width=64,
    ),
    output_type="latent",
    two_call_cfg=True,
)


def test_qwenimage_family_contract():
    check_family(CASE)


# the DuCa preset (its conservative steps reuse attn whole), aggressive steps that forecast every module (instead of
# skipping the stack) and a budget's plan
SKIPPING = [dict(config="duca"), dict(config="duca", aggressive="reuse"), dict(budget=4)]


@pytest.mark.parametrize("options", SKIPPING, ids=["duca", "duca-aggressive-reuse", "budget=4"])
def test_qwenimage_skips_the_norms_of_reused_modules(options, monkeypatch):
    """img_norm1 and txt_norm1 (for attn alone), img_norm2 (for img_mlp alone) and txt_norm2 (for txt_mlp alone): one
    row where their reader reuses, the latents bit for bit those with every norm running."""
    check_unread_work_is_skipped(CASE, options, monkeypatch, functions=("layer_norm",))
