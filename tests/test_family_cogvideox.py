"""CogVideoX 1.0 and 1.5 (joint [text; video] rows, latents (B, F, C, H, W)) through the public API.

The tiny pipelines have a real (tiny) T5 text encoder and return latents (no CogVideoX VAE): everything
the cache touches runs inside the transformer.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
from family_harness import FamilyCase, check_family, check_partial_self_attention, check_unread_work_is_skipped
from tiny_pipelines import tiny_t5_encoder, tiny_t5_tokenizer


def tiny_cogvideox_pipeline(seed: int = 0, version: str = "1.0", num_layers: int = 3) -> CogVideoXPipeline:
    """128x128 pixels -> 16x16 latents, patch 2 -> 64 tokens per frame; 3 blocks by default.
    1.0: 9 frames -> 3 latent frames; 1.5 (``patch_size_t=2``): padded to 4 latent frames -> 2 token frames."""
    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = tiny_t5_encoder(tokenizer, d_model=8, d_ff=16, num_heads=2, d_kv=4)
    extra = dict(patch_size_t=2, patch_bias=False) if version == "1.5" else {}
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=4,
        text_embed_dim=8, num_layers=num_layers, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8, use_rotary_positional_embeddings=True, **extra,
    ).eval()
    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=None, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


_CALL = dict(prompt="a red car", negative_prompt="a blue tree", height=128, width=128, num_frames=9,
             guidance_scale=6.0, max_sequence_length=8)

CASE = FamilyCase("cogvideox", build=tiny_cogvideox_pipeline, call_kwargs=_CALL, output_type="latent")
CASE_15 = FamilyCase("cogvideox_1_5", build=lambda: tiny_cogvideox_pipeline(version="1.5"), call_kwargs=_CALL,
                     output_type="latent")


def test_cogvideox_family_contract():
    check_family(CASE)


def test_cogvideox_1_5_family_contract():
    check_family(CASE_15)


@pytest.mark.parametrize("case", [CASE, CASE_15], ids=["1.0", "1.5"])
def test_cogvideox_partial_joint_attention(case):
    """self_attention="partial": every text row plus the selected video rows, RoPE on the video rows only."""
    check_partial_self_attention(case.build(), case)


# aggressive steps that forecast every module (instead of skipping the stack) and a budget's plan
SKIPPING = [dict(config="duca", aggressive="reuse"), dict(budget=4)]


@pytest.mark.parametrize("options", SKIPPING, ids=["duca-aggressive-reuse", "budget=4"])
@pytest.mark.parametrize("case", [CASE, CASE_15], ids=["1.0", "1.5"])
def test_cogvideox_skips_the_norms_of_reused_modules(case, options, monkeypatch):
    """norm1.norm (video and text rows, for attn1 alone) and norm2.norm (for ff alone): one row of each stream where
    the module reuses, the latents bit for bit those with every norm running."""
    check_unread_work_is_skipped(case, options, monkeypatch, functions=("layer_norm",))
