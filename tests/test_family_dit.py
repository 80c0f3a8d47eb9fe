"""DiT (class-conditional `DiTPipeline`, `BasicTransformerAdapter`) through the public API."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel
from family_harness import FamilyCase, check_family
from tiny_pipelines import tiny_vae

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread (conftest)


def tiny_dit_family_pipeline(seed: int = 0) -> DiTPipeline:
    """16x16 latents, patch 2 -> 64 tokens, 3 blocks; learned sigma (8 output channels) like the released DiT."""
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=3, sample_size=16,
        patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=4,
    ).eval()
    pipe = DiTPipeline(transformer=transformer, vae=tiny_vae(seed), scheduler=DDIMScheduler(),
                       id2label={i: f"class_{i}" for i in range(10)})
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASE = FamilyCase("dit", build=tiny_dit_family_pipeline, call_kwargs=dict(class_labels=[1], guidance_scale=4.0))


def test_dit_family_contract():
    check_family(CASE)
