"""SD3 / SD3.5 (`StableDiffusion3Pipeline`, MMDiT blocks returning (text, image)) through the public API.

The tiny transformer is an SD3.5 one (`attn2` in block 0 only, RMS q/k norm) with 4 blocks, the last
`context_pre_only`. A second case turns on skip-layer guidance, whose third transformer call per step
has batch size 1 and runs without the skipped layers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from family_harness import FamilyCase, check_family, check_unread_work_is_skipped, run
from tiny_pipelines import tiny_clip_text_encoder, tiny_clip_tokenizer, tiny_t5_encoder, tiny_t5_tokenizer

from dualcache_diffusers import cache_stats, disable_dual_cache, enable_dual_cache
from dualcache_diffusers.api import get_engine

TEXT_LEN = 8  # CLIP and T5 tokens each: 16 text rows


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread (conftest)


def tiny_clip(tokenizer, seed: int):
    torch.manual_seed(seed)
    return tiny_clip_text_encoder(tokenizer, hidden=16, intermediate=24, max_positions=TEXT_LEN, projection_dim=32,
                                  with_projection=True)


def tiny_sd3_pipeline(seed: int = 0, num_layers: int = 4) -> StableDiffusion3Pipeline:
    """16x16 latents, patch 2 -> 64 image tokens, 16 text tokens, 4 MMDiT blocks by default (SD3.5: attn2 in
    block 0; the last block context_pre_only)."""
    clip_tokenizer = tiny_clip_tokenizer(TEXT_LEN)
    t5_tokenizer = tiny_t5_tokenizer()
    text_encoder = tiny_clip(clip_tokenizer, seed)
    text_encoder_2 = tiny_clip(clip_tokenizer, seed + 1)
    torch.manual_seed(seed)
    text_encoder_3 = tiny_t5_encoder(t5_tokenizer)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=num_layers, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
    ).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
        shift_factor=0.0, scaling_factor=1.0, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=text_encoder, tokenizer=clip_tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_clip_tokenizer(TEXT_LEN), text_encoder_3=text_encoder_3, tokenizer_3=t5_tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


_CALL = dict(prompt="red car", height=16, width=16, guidance_scale=4.0, max_sequence_length=TEXT_LEN)

CASE = FamilyCase("sd3", build=tiny_sd3_pipeline, call_kwargs=_CALL)
# skip-layer guidance: steps 1-3 of 20 add a batch-1 call without block 1
SLG_CASE = FamilyCase("sd3_slg", build=tiny_sd3_pipeline,
                      call_kwargs=dict(_CALL, skip_guidance_layers=[1], skip_layer_guidance_stop=0.2))


def test_sd3_family_contract():
    check_family(CASE)


def test_sd3_skip_layer_guidance():
    check_family(SLG_CASE)
    pipe = tiny_sd3_pipeline()
    enable_dual_cache(pipe, "duca")
    try:
        run(pipe, SLG_CASE)
        engine = get_engine(pipe)
        calls = {key: s.num_calls for key, s in engine.last_stats.items()}
        assert calls == {"call0/2/0": 20, "call1/1/0": 3}, calls  # by call order within a step, and batch
        assert cache_stats(pipe).flops_speedup > 1.5
    finally:
        disable_dual_cache(pipe)
    assert np.isfinite(run(pipe, SLG_CASE)).all()


def test_skip_layer_guidance_that_skips_the_last_block_reuses_modules_instead_of_skipping_the_stack():
    from family_harness import run

    from dualcache_diffusers import disable_dual_cache, enable_dual_cache
    from dualcache_diffusers.api import get_engine

    case = FamilyCase("sd3_slg_last", build=tiny_sd3_pipeline,
                      call_kwargs=dict(_CALL, skip_guidance_layers=[3], skip_layer_guidance_stop=0.5))
    pipe = case.build()
    enable_dual_cache(pipe, "duca")
    out = run(pipe, case)
    stats = get_engine(pipe).last_stats
    disable_dual_cache(pipe)
    slg_kinds = [kinds for key, s in stats.items() if key.split("/")[1] == "1" for kinds in [s.step_kinds]]
    assert slg_kinds and "aggressive" not in slg_kinds[0] and "reuse" in slg_kinds[0]
    main_kinds = next(s.step_kinds for key, s in stats.items() if key.split("/")[1] == "2")
    assert "aggressive" in main_kinds  # the main branch still skips its stack
    assert np.isfinite(out).all()


# aggressive steps that forecast every module (instead of skipping the stack) and a budget's plan
SKIPPING = [dict(config="duca", aggressive="reuse"), dict(budget=4)]


@pytest.mark.parametrize("options", SKIPPING, ids=["duca-aggressive-reuse", "budget=4"])
def test_sd3_skips_the_norms_of_reused_modules(options, monkeypatch):
    """norm1.norm (read by attn, and attn2 in SD3.5's dual-attention block 0), norm1_context.norm (AdaLayerNormZero,
    AdaLayerNormContinuous in the context_pre_only last block) and each MLP's norm2*: one row where their readers
    reuse, the images bit for bit those with every norm running."""
    check_unread_work_is_skipped(CASE, options, monkeypatch, functions=("layer_norm",))
