#!/usr/bin/env python
"""Cache memory of each supported family at its usual resolution, computed on the ``meta`` device.

Every model is built from its published config (hard-coded below, from the model repos' ``config.json``)
under ``torch.device("meta")``: no weights are downloaded or allocated. The engine is then enabled with
the family's preset (DuCa by default) and the transformer is called for a few steps with meta inputs of
the usual size, so the figure is the engine's own peak accounting (``cache_stats(...).cache_bytes``:
module outputs, the block stack's output, the forecast history and the token scores, in the model's
dtype), not a formula. Meta tensors carry shapes and dtypes, so the byte counts are exact; nothing is
timed.

Each call is made with batch 1; a pipeline that runs classifier-free guidance keeps one cache per
branch (two branches, or one batch of two), so the figure is multiplied by the family's number of CFG
branches (guidance-distilled Flux.1-dev and HunyuanVideo have one). Transient tensors (a forecast being
formed, a partial step's gathered rows) and the activations of a forward pass are not included.

    python benchmarks/cache_memory.py                      # every family, DuCa preset, bf16
    python benchmarks/cache_memory.py --preset fora --only wan2.1-1.3b-480p
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dualcache_diffusers import cache_stats, enable_dual_cache
from dualcache_diffusers.api import get_engine


@dataclass
class Family:
    name: str  # the row's label
    model: str  # diffusers class name
    config: dict[str, Any]
    resolution: str
    inputs: Callable[[torch.dtype], dict[str, Any]]  # meta inputs of one branch (batch 1)
    tokens: int  # image tokens per call (the token grid the engine is told)
    text: int = 0  # text tokens per call
    cfg_branches: int = 2
    extra: dict[str, Any] = field(default_factory=dict)


def _empty(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _t(dtype: torch.dtype) -> torch.Tensor:
    return _empty(1, dtype=torch.float32)


DIT_XL = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
              sample_size=64, patch_size=2, num_embeds_ada_norm=1000)
PIXART_SIGMA = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                    cross_attention_dim=1152, caption_channels=4096, sample_size=128, patch_size=2,
                    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                    attention_bias=True, activation_fn="gelu-approximate", use_additional_conditions=False,
                    interpolation_scale=2)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
SANA_1600M = dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
                  num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
                  caption_channels=2304, mlp_ratio=2.5, sample_size=32, patch_size=1)
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6)
WAN_14B = dict(WAN_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
HUNYUAN_VIDEO = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
                     num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
                     qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
                     rope_theta=256.0, rope_axes_dim=(16, 56, 56))
COGVIDEOX_5B = dict(num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, num_layers=42,
                    text_embed_dim=4096, time_embed_dim=512, sample_width=90, sample_height=60, sample_frames=49,
                    patch_size=2, temporal_compression_ratio=4, max_text_seq_length=226,
                    use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False)
LTX_VIDEO = dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
                 attention_head_dim=64, cross_attention_dim=2048, num_layers=28, caption_channels=4096,
                 qk_norm="rms_norm_across_heads")


def _wan(frames: int, height: int, width: int) -> Callable[[torch.dtype], dict[str, Any]]:
    return lambda dtype: dict(hidden_states=_empty(1, 16, frames, height, width, dtype=dtype), timestep=_t(dtype),
                              encoder_hidden_states=_empty(1, 512, 4096, dtype=dtype))


FAMILIES = [
    Family("dit-xl-2-512", "DiTTransformer2DModel", DIT_XL, "512 px", lambda d: dict(
        hidden_states=_empty(1, 4, 64, 64, dtype=d), timestep=_t(d),
        class_labels=torch.zeros(1, dtype=torch.long, device="meta")), tokens=32 * 32),
    Family("pixart-sigma-1024", "PixArtTransformer2DModel", PIXART_SIGMA, "1024 px", lambda d: dict(
        hidden_states=_empty(1, 4, 128, 128, dtype=d), timestep=_t(d),
        encoder_hidden_states=_empty(1, 300, 4096, dtype=d),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None}), tokens=64 * 64, text=300),
    Family("flux.1-dev-1024", "FluxTransformer2DModel", FLUX_DEV, "1024 px", lambda d: dict(
        hidden_states=_empty(1, 4096, 64, dtype=d), timestep=_t(d), guidance=_t(d),
        encoder_hidden_states=_empty(1, 512, 4096, dtype=d), pooled_projections=_empty(1, 768, dtype=d),
        img_ids=_empty(4096, 3, dtype=torch.float32), txt_ids=_empty(512, 3, dtype=torch.float32)),
        tokens=64 * 64, text=512, cfg_branches=1),
    Family("sd3.5-large-1024", "SD3Transformer2DModel", SD35_LARGE, "1024 px", lambda d: dict(
        hidden_states=_empty(1, 16, 128, 128, dtype=d), timestep=_t(d),
        encoder_hidden_states=_empty(1, 333, 4096, dtype=d), pooled_projections=_empty(1, 2048, dtype=d)),
        tokens=64 * 64, text=333),
    Family("sana-1600m-1024", "SanaTransformer2DModel", SANA_1600M, "1024 px", lambda d: dict(
        hidden_states=_empty(1, 32, 32, 32, dtype=d), timestep=_t(d),
        encoder_hidden_states=_empty(1, 300, 2304, dtype=d)), tokens=32 * 32, text=300),
    Family("wan2.1-1.3b-480p", "WanTransformer3DModel", WAN_1_3B, "832x480 x 81 frames", _wan(21, 60, 104),
           tokens=21 * 30 * 52, text=512),
    Family("wan2.1-14b-480p", "WanTransformer3DModel", WAN_14B, "832x480 x 81 frames", _wan(21, 60, 104),
           tokens=21 * 30 * 52, text=512),
    Family("wan2.1-14b-720p", "WanTransformer3DModel", WAN_14B, "1280x720 x 81 frames", _wan(21, 90, 160),
           tokens=21 * 45 * 80, text=512),
    Family("hunyuanvideo-720p", "HunyuanVideoTransformer3DModel", HUNYUAN_VIDEO, "1280x720 x 129 frames",
           lambda d: dict(hidden_states=_empty(1, 16, 33, 90, 160, dtype=d), timestep=_t(d), guidance=_t(d),
                          encoder_hidden_states=_empty(1, 256, 4096, dtype=d),
                          encoder_attention_mask=torch.ones(1, 256, dtype=torch.bool, device="meta"),
                          pooled_projections=_empty(1, 768, dtype=d)),
           tokens=33 * 45 * 80, text=256, cfg_branches=1),
    Family("cogvideox-5b", "CogVideoXTransformer3DModel", COGVIDEOX_5B, "720x480 x 49 frames", lambda d: dict(
        hidden_states=_empty(1, 13, 16, 60, 90, dtype=d), timestep=_t(d),
        encoder_hidden_states=_empty(1, 226, 4096, dtype=d)), tokens=13 * 30 * 45, text=226),
    Family("ltx-video-768x512", "LTXVideoTransformer3DModel", LTX_VIDEO, "768x512 x 121 frames", lambda d: dict(
        hidden_states=_empty(1, 16 * 16 * 24, 128, dtype=d), timestep=_t(d),
        encoder_hidden_states=_empty(1, 128, 4096, dtype=d),
        encoder_attention_mask=torch.ones(1, 128, dtype=torch.bool, device="meta"),
        num_frames=16, height=16, width=24), tokens=16 * 16 * 24, text=128),
]


class _Scheduler:
    """Just enough of a scheduler for the engine to read the number of steps."""

    def __init__(self, steps: int) -> None:
        self.timesteps = list(range(steps))

    def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        pass


class _Pipeline:
    def __init__(self, transformer: torch.nn.Module, steps: int) -> None:
        self.transformer = transformer
        self.scheduler = _Scheduler(steps)


def build(family: Family, dtype: torch.dtype) -> torch.nn.Module:
    import diffusers

    cls = getattr(diffusers, family.model)
    with torch.device("meta"):
        model = cls(**family.config).to(dtype).eval()
    return model


def measure(family: Family, preset: str, steps: int, dtype: torch.dtype) -> dict[str, Any]:
    model = build(family, dtype)
    pipe = _Pipeline(model, steps)
    config = enable_dual_cache(pipe, preset)
    engine = get_engine(pipe)
    for denoiser in engine.denoisers:  # meta tensors have no values: tell the grid instead of reading it
        denoiser.adapter = copy.copy(denoiser.adapter)  # adapters are shared by every engine: patch a copy
        denoiser.adapter.token_grid = lambda *args, tokens=family.tokens: (1, 1, tokens)
    # random token scores (families without a readable value projection) are made per step, never stored:
    # on meta, where no generator exists, any tensor of their shape does
    engine._random_scores = lambda call, groups, tokens, device: torch.empty(groups, tokens, device=device)
    pipe.scheduler.set_timesteps(steps)
    inputs = family.inputs(dtype)
    start = time.perf_counter()
    context = model.cache_context("cond") if hasattr(model, "cache_context") else contextlib.nullcontext()
    with torch.no_grad(), context:
        for _ in range(steps):
            model(**inputs, return_dict=False)
    stats = cache_stats(pipe)
    cache = stats.cache_bytes * family.cfg_branches
    return dict(family=family.name, resolution=family.resolution, tokens=family.tokens, text=family.text,
                cfg=family.cfg_branches, preset=preset, forecast_order=config.forecast_order,
                pattern="".join(k[0].upper() for k in stats.step_kinds), cache_bytes=cache,
                weight_bytes=stats.weight_bytes, seconds=time.perf_counter() - start)


def markdown(rows: list[dict[str, Any]], dtype: str) -> str:
    gib = 2**30
    lines = [
        f"| model | resolution | image + text tokens | CFG branches | cache ({rows[0]['preset']} preset, {dtype}) "
        "| weights | cache / weights |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['resolution']} | {r['tokens']:,} + {r['text']} | {r['cfg']} "
            f"| {r['cache_bytes'] / gib:.2f} GiB | {r['weight_bytes'] / gib:.2f} GiB "
            f"| {r['cache_bytes'] / r['weight_bytes']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="duca", choices=["duca", "toca", "fora"])
    parser.add_argument("--steps", type=int, default=6, help="calls made (the peak is reached once the "
                        "forecast history is full: after the second full step)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--only", nargs="+", default=None, choices=[f.name for f in FAMILIES])
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    rows = []
    for family in FAMILIES:
        if args.only and family.name not in args.only:
            continue
        row = measure(family, args.preset, args.steps, dtype)
        print(f"{row['family']}: pattern {row['pattern']}, cache {row['cache_bytes'] / 2**30:.2f} GiB, "
              f"weights {row['weight_bytes'] / 2**30:.2f} GiB ({row['seconds']:.0f} s)", flush=True)
        rows.append(row)
    print(markdown(rows, args.dtype))


if __name__ == "__main__":
    main()
