"""CogView4 (joint attention, one `ff` called on image then text rows, two-call CFG) through the public API.

The tiny pipeline is given prompt embeddings directly (no GLM text encoder) and returns latents: everything
the cache touches runs inside the transformer.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
from family_harness import FamilyCase, check_family, check_unread_work_is_skipped

TEXT_DIM, TEXT_LEN = 16, 16


def tiny_cogview4_pipeline(seed: int = 0) -> CogView4Pipeline:
    """128x128 pixels -> 16x16 latents, patch 2 -> 64 tokens; 3 blocks."""
    torch.manual_seed(seed)
    transformer = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=TEXT_DIM, time_embed_dim=8, condition_dim=4, sample_size=16, rope_axes_dim=(4, 4),
    ).eval()
    pipe = CogView4Pipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                            scheduler=FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75,
                                                                      base_image_seq_len=256))
    pipe.set_progress_bar_config(disable=True)
    return pipe


_G = torch.Generator().manual_seed(1)
CASE = FamilyCase(
    "cogview4", build=tiny_cogview4_pipeline, output_type="latent", two_call_cfg=True,
    call_kwargs=dict(prompt_embeds=torch.randn(1, TEXT_LEN, TEXT_DIM, generator=_G),
                     negative_prompt_embeds=torch.randn(1, TEXT_LEN, TEXT_DIM, generator=_G), height=128, width=128,
                     guidance_scale=5.0),
)


def test_cogview4_family_contract():
    check_family(CASE)


# the DuCa preset (its conservative steps reuse attn1 whole), aggressive steps that forecast every module (instead of
# skipping the stack) and a budget's plan
SKIPPING = [dict(config="duca"), dict(config="duca", aggressive="reuse"), dict(budget=4)]


@pytest.mark.parametrize("options", SKIPPING, ids=["duca", "duca-aggressive-reuse", "budget=4"])
def test_cogview4_skips_the_norms_of_reused_modules(options, monkeypatch):
    """norm1.norm and norm1.norm_context (image and text rows, for attn1 alone), norm2 and norm2_context (for ff's
    image and text calls): one row where their reader reuses, the latents bit for bit those with every norm
    running."""
    check_unread_work_is_skipped(CASE, options, monkeypatch, functions=("layer_norm",))
