"""HunyuanVideo (double + single stream blocks, [image; text] rows) through the public API.

The tiny pipeline is given prompt embeddings directly (no Llama / CLIP text encoders) and returns
latents (no HunyuanVideo VAE): everything the cache touches runs inside the transformer.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
from family_harness import FamilyCase, check_family, check_partial_preset_flops, check_partial_self_attention

TEXT_DIM, POOLED_DIM, TEXT_LEN = 16, 8, 6


def tiny_hunyuan_video_pipeline(seed: int = 0) -> HunyuanVideoPipeline:
    """64x64 pixels -> 8x8 latents (patch 1) = 64 tokens per frame, 5 frames -> 2 latent frames;
    3 double + 3 single blocks."""
    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=3,
        num_single_layers=3, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM, rope_axes_dim=(2, 4, 4),
    ).eval()
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=None,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embeds(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(1, TEXT_LEN)
    mask[:, -2:] = 0  # padded text rows, as the Llama encoder's attention mask gives them
    return dict(embeds=torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g), pooled=torch.randn(1, POOLED_DIM, generator=g),
                mask=mask)


_POS, _NEG = _embeds(1), _embeds(2)
_COMMON = dict(height=64, width=64, num_frames=5, guidance_scale=6.0, prompt_embeds=_POS["embeds"],
               pooled_prompt_embeds=_POS["pooled"], prompt_attention_mask=_POS["mask"])

CASE = FamilyCase("hunyuan_video", build=tiny_hunyuan_video_pipeline, call_kwargs=_COMMON, output_type="latent")
# true CFG: a second call per step in cache_context("uncond")
CASE_TRUE_CFG = FamilyCase(
    "hunyuan_video_true_cfg", build=tiny_hunyuan_video_pipeline, output_type="latent", two_call_cfg=True,
    presets=("duca",),
    call_kwargs=dict(_COMMON, true_cfg_scale=4.0, negative_prompt_embeds=_NEG["embeds"],
                     negative_pooled_prompt_embeds=_NEG["pooled"], negative_prompt_attention_mask=_NEG["mask"]),
)


def test_hunyuan_video_family_contract():
    check_family(CASE)


def test_hunyuan_video_true_cfg_branches():
    check_family(CASE_TRUE_CFG)


def test_hunyuan_video_token_replace_bare_transformer():
    """The I2V token-replace blocks, called positionally (timestep is argument 1) by a hand-written loop."""
    from dualcache_diffusers import cache_stats, disable_dual_cache, enable_dual_cache

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=8, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=3,
        num_single_layers=3, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM, rope_axes_dim=(2, 4, 4),
        image_condition_type="token_replace",
    ).eval()
    latents = torch.randn(1, 8, 2, 8, 8)

    def loop() -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([
                model(latents, torch.tensor([t]), _POS["embeds"], _POS["mask"], _POS["pooled"],
                      guidance=torch.tensor([6000.0]), return_dict=False)[0]
                for t in torch.linspace(999, 50, 10)
            ])

    stock = loop()
    enable_dual_cache(model, "duca", interval=1, num_inference_steps=10)
    assert torch.allclose(loop(), stock, atol=1e-5, rtol=0)
    for preset in ("duca", "toca", "fora"):
        enable_dual_cache(model, preset, num_inference_steps=10)
        out, stats = loop(), cache_stats(model)
        assert torch.isfinite(out).all()
        assert stats.flops_uncached / stats.flops >= 2.0, (preset, stats.flops_uncached / stats.flops)
    disable_dual_cache(model)
    assert torch.equal(loop(), stock)


@pytest.mark.parametrize("blocks", ["transformer_blocks", "single_transformer_blocks"])
def test_hunyuan_video_partial_joint_attention(blocks):
    """self_attention="partial": every text row (padded keys masked) plus the selected image rows recomputed."""
    check_partial_self_attention(CASE.build(), CASE, blocks=blocks)


def test_hunyuan_video_duca_with_partial_attention_cuts_flops():
    check_partial_preset_flops(CASE, "duca")
