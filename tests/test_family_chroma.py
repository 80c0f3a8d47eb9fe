"""Chroma (Flux-like blocks; two transformer calls per step without a cache_context) through the public API."""

from __future__ import annotations

import pytest
import torch
from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
from family_harness import FamilyCase, check_family, check_partial_self_attention
from test_family_flux import tiny_flux_vae
from tiny_pipelines import tiny_t5_encoder, tiny_t5_tokenizer


def tiny_chroma_pipeline(seed: int = 0) -> ChromaPipeline:
    """16x16 latents packed 2x2 -> 64 image tokens, 8 text tokens, 3 double + 3 single blocks."""
    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = tiny_t5_encoder(tokenizer, num_heads=2)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=3, num_single_layers=3, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_num_channels=16,
        approximator_hidden_dim=32, approximator_layers=1,
    ).eval()
    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_flux_vae(seed),
                          text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASE = FamilyCase(
    "chroma",
    build=tiny_chroma_pipeline,
    call_kwargs=dict(prompt="a red car", negative_prompt="a blue car", height=16, width=16,
                     max_sequence_length=8, guidance_scale=4.0),
    two_call_cfg=True,
)


def test_chroma_family_contract():
    check_family(CASE)


@pytest.mark.parametrize("blocks", ["transformer_blocks", "single_transformer_blocks"])
def test_chroma_partial_joint_attention(blocks):
    """self_attention="partial" with Chroma's text-padding mask (query x key) gathered at the query rows."""
    check_partial_self_attention(CASE.build(), CASE, blocks=blocks)
