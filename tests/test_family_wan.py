"""Wan 2.1 / 2.2 (T2V, TI2V-5B style, A14B two experts), Wan VACE and SkyReels-V2 through the public API."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    SkyReelsV2Pipeline,
    SkyReelsV2Transformer3DModel,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
    WanVACEPipeline,
    WanVACETransformer3DModel,
)
from family_harness import FamilyCase, check_family, check_partial_self_attention, check_unread_work_is_skipped, run
from tiny_pipelines import tiny_t5_encoder, tiny_t5_tokenizer

from dualcache_diffusers import disable_dual_cache, enable_dual_cache
from dualcache_diffusers.api import get_engine

# 16x16 latents (128x128 pixels through the 8x VAE), patch (1, 2, 2) -> 64 tokens per frame; 5 frames -> 2 latent frames
WAN_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
                  out_channels=16, text_dim=16, freq_dim=32, ffn_dim=64, num_layers=3, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
# Wan's prompt cleaning needs `ftfy` (not installed): the prompts are given as embeddings (UMT5 width 16)
_EMBEDS = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
CALL = dict(prompt_embeds=_EMBEDS[0], negative_prompt_embeds=_EMBEDS[1], height=128, width=128, num_frames=5,
            guidance_scale=4.0)


def _text(seed: int):
    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    encoder = tiny_t5_encoder(tokenizer, d_model=16, d_ff=24, num_heads=2, umt5=True)
    return tokenizer, encoder


def _vae(seed: int) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def _transformer(seed: int, cls=WanTransformer3DModel, **extra):
    torch.manual_seed(seed)
    return cls(**{**WAN_CONFIG, **extra}).eval()


def tiny_wan_pipeline(seed: int = 0, experts: int = 1, expand_timesteps: bool = False,
                      num_layers: int = WAN_CONFIG["num_layers"]) -> WanPipeline:
    tokenizer, encoder = _text(seed)
    extra = {}
    if experts == 2:  # Wan 2.2 A14B: high-noise expert, then the low-noise expert below the boundary
        extra = dict(transformer_2=_transformer(seed + 1, num_layers=num_layers), boundary_ratio=0.875)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=_vae(seed),
                       scheduler=FlowMatchEulerDiscreteScheduler(),
                       transformer=_transformer(seed, num_layers=num_layers), expand_timesteps=expand_timesteps,
                       **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_wan_vace_pipeline(seed: int = 0) -> WanVACEPipeline:
    """6 main blocks (cached) and one VACE block (always computed)."""
    tokenizer, encoder = _text(seed)
    transformer = _transformer(seed, WanVACETransformer3DModel, num_layers=6, vace_layers=[0], vace_in_channels=96)
    pipe = WanVACEPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=_vae(seed),
                           scheduler=FlowMatchEulerDiscreteScheduler(), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_skyreels_pipeline(seed: int = 0) -> SkyReelsV2Pipeline:
    tokenizer, encoder = _text(seed)
    pipe = SkyReelsV2Pipeline(tokenizer=tokenizer, text_encoder=encoder, vae=_vae(seed),
                              scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                                flow_shift=8.0),
                              transformer=_transformer(seed, SkyReelsV2Transformer3DModel))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# The tiny Wan VAE decoder costs as much CPU time as the 40 transformer calls of a generation: the cases compare
# latents (output_type="latent"), so the FLOP ratios are the denoising loop's.
_LATENT = dict(output_type="latent", two_call_cfg=True)

CASES = {
    "wan21": FamilyCase("wan21", build=tiny_wan_pipeline, call_kwargs=CALL, **_LATENT),
    "wan22_ti2v": FamilyCase("wan22_ti2v", build=lambda: tiny_wan_pipeline(expand_timesteps=True), call_kwargs=CALL,
                             **_LATENT),
    # two experts: the harness's branch check expects every call on one denoiser (checked below instead)
    "wan22_a14b": FamilyCase("wan22_a14b", build=lambda: tiny_wan_pipeline(experts=2), call_kwargs=CALL,
                             output_type="latent"),
    # the VACE blocks and the VAE encoding of the control video always run (1 of 7 blocks here, 8 of 48 in
    # Wan2.1-VACE-14B): the default presets cut this tiny pipeline's FLOPs only 1.7-1.9x over 20 steps, so the test
    # runs them with longer cycles (measured: DuCa N=10 2.14x, FORA N=8 2.17x, ToCa N=10 2.01x)
    "wan_vace": FamilyCase("wan_vace", build=tiny_wan_vace_pipeline, call_kwargs=CALL, **_LATENT,
                           overrides=dict(duca=dict(interval=10), toca=dict(interval=12), fora=dict(interval=8))),
    "skyreels_v2": FamilyCase("skyreels_v2", build=tiny_skyreels_pipeline, call_kwargs=CALL, **_LATENT),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_wan_family_contract(name):
    check_family(CASES[name])


@pytest.mark.parametrize("name", ["wan21", "wan_vace", "skyreels_v2"])
def test_wan_partial_self_attention(name):
    """attn1 (RoPE): selected queries against all keys and values, the rotary table sliced to them."""
    case = CASES[name]
    check_partial_self_attention(case.build(), case)


# aggressive steps that forecast every module (instead of skipping the stack) and a budget's plan: where attn1, attn2
# or ffn reuses, its norm (norm1, norm2, norm3: FP32LayerNorm, through F.layer_norm) is skipped
SKIPPING = [dict(config="duca", aggressive="reuse"), dict(budget=4)]


@pytest.mark.parametrize("options", SKIPPING, ids=["duca-aggressive-reuse", "budget=4"])
@pytest.mark.parametrize("name", ["wan21", "wan22_ti2v", "wan_vace", "skyreels_v2"])
def test_wan_skips_the_norms_of_reused_modules(name, options, monkeypatch):
    """Each module's input norm, adaLN-modulated rows (per token under Wan 2.2 TI2V's expanded timesteps) read by
    it alone: one row where it reuses, the latents bit for bit those with every norm running."""
    check_unread_work_is_skipped(CASES[name], options, monkeypatch, functions=("layer_norm",))


def test_wan22_a14b_caches_both_experts():
    case = CASES["wan22_a14b"]
    pipe = case.build()
    enable_dual_cache(pipe, "duca")
    try:
        run(pipe, case)
        assert getattr(pipe.transformer, "_dualcache_engine", None) is not None
        assert getattr(pipe.transformer_2, "_dualcache_engine", None) is not None
        stats = get_engine(pipe).last_stats
        assert {key.rsplit("/", 1)[1] for key in stats} == {"0", "1"}, sorted(stats)
        assert {key.split("/")[0] for key in stats} == {"cond", "uncond"}, sorted(stats)
        for index in "01":  # each expert skips or partially computes some of its steps
            kinds = [kind for key, s in stats.items() if key.endswith(f"/{index}") for kind in s.step_kinds]
            assert kinds and set(kinds) != {"full"}, (index, kinds)
        for branch in ("cond", "uncond"):  # each branch's 20 calls, split between the experts
            assert sum(s.num_calls for key, s in stats.items() if key.startswith(branch + "/")) == 20
    finally:
        disable_dual_cache(pipe)
