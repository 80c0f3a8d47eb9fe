"""HunyuanVideo (double + single stream blocks, [image; text] rows) through the public API.

The tiny pipeline is given prompt embeddings directly (no Llama / CLIP text encoders) and returns
latents (no HunyuanVideo VAE): everything the cache touches runs inside the transformer.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
from family_harness import (
    FamilyCase,
    check_family,
    check_partial_preset_flops,
    check_partial_self_attention,
    check_unread_work_is_skipped,
    count_elements,
    switch_off_unread_skipping,
)

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


def tiny_token_replace_transformer() -> HunyuanVideoTransformer3DModel:
    """The I2V token-replace blocks (HunyuanVideoTokenReplace*TransformerBlock), 3 double + 3 single."""
    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(
        in_channels=8, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=3,
        num_single_layers=3, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM, rope_axes_dim=(2, 4, 4),
        image_condition_type="token_replace",
    ).eval()


def token_replace_loop(model: HunyuanVideoTransformer3DModel, steps: int = 10) -> torch.Tensor:
    """The model called positionally (timestep is argument 1) at ``steps`` timesteps on fixed latents."""
    latents = torch.randn(1, 8, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.stack([
            model(latents, torch.tensor([t]), _POS["embeds"], _POS["mask"], _POS["pooled"],
                  guidance=torch.tensor([6000.0]), return_dict=False)[0]
            for t in torch.linspace(999, 50, steps)
        ])


def test_hunyuan_video_token_replace_bare_transformer():
    """The I2V token-replace blocks, called positionally (timestep is argument 1) by a hand-written loop."""
    from dualcache_diffusers import cache_stats, disable_dual_cache, enable_dual_cache

    model = tiny_token_replace_transformer()

    def loop() -> torch.Tensor:
        return token_replace_loop(model)

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


# aggressive steps that forecast every module (instead of skipping the stack) and a budget's plan: where the double
# blocks' attn / ff / ff_context reuse, their norms are skipped, and the single blocks' norm where proj_mlp and attn
# both do
SKIPPING = [dict(config="duca", aggressive="reuse"), dict(budget=4)]


@pytest.mark.parametrize("options", SKIPPING, ids=["duca-aggressive-reuse", "budget=4"])
def test_hunyuan_video_skips_the_norms_of_reused_modules(options, monkeypatch):
    """Double blocks: the joint attention's two norms and each MLP's norm; single blocks: the norm shared by proj_mlp
    and attn. One row where their readers reuse, the latents bit for bit those with every norm running."""
    check_unread_work_is_skipped(CASE, options, monkeypatch, functions=("layer_norm",))


def test_hunyuan_video_token_replace_blocks_skip_the_norms_of_reused_modules(monkeypatch):
    """The token-replace blocks slice the norms' rows at the first frame's tokens before modulating them: the one-row
    placeholder passes through those slices, and the output is bit for bit that with every norm running."""
    from dualcache_diffusers import disable_dual_cache, enable_dual_cache

    seen = count_elements(monkeypatch, ("layer_norm",))

    def generate() -> tuple[torch.Tensor, int]:
        model = tiny_token_replace_transformer()
        seen["layer_norm"] = 0
        enable_dual_cache(model, "duca", aggressive="reuse", num_inference_steps=10)
        try:
            return token_replace_loop(model), seen["layer_norm"]
        finally:
            disable_dual_cache(model)

    skipping, fewer = generate()
    switch_off_unread_skipping(monkeypatch)
    every, more = generate()
    assert torch.equal(skipping, every)
    assert fewer < more, (fewer, more)
