#!/usr/bin/env python
"""Speed benchmark: FLOPs speedup, wall speedup and efficiency of FORA / ToCa / DuCa at the sizes users run.

Models (``--models``), random weights, batch 1 with classifier-free guidance (one batch of two):

* ``dit``: ``DiTTransformer2DModel`` of DiT-XL/2 size in a stock ``DiTPipeline`` with a one-level VAE (so the
  decode costs next to nothing and the denoising loop is what is timed); 512 px = 1024 tokens.
* ``pixart-sigma`` (PixArt-Sigma XL 1024 px: 4096 tokens + 300 text), ``flux`` (Flux.1 size, 1024 px: 4096
  image + 512 text tokens, 19 + 38 blocks), ``wan-1.3b`` / ``wan-14b`` (Wan 2.1 at 480p x 81 frames: 32,760
  tokens + 512 text): the transformer in a plain flow-matching Euler loop with CFG (no text encoder / VAE:
  their cost is the same with and without caching), driven through a stand-in pipeline whose scheduler
  the engine follows, as it follows a stock pipeline's.

``--size cpu`` keeps each architecture (block types, cached modules, text tokens) but with few layers,
a small width and few tokens, so that every model finishes in a few minutes on one CPU thread.
``--size cpu-wide`` is the same with width 768 (the GEMMs 4-9x larger, the per-call fixed costs the same),
nearer the balance of the real sizes, where the width is 1152-5120.
Random weights prove the mechanics and the cost, never quality.

* FLOPs: ``FlopCounterMode`` (``dualcache_diffusers.count_flops``) around one whole pipeline call per method;
  the engine's own analytic count is reported next to it.
* Wall: every repeat runs all methods back to back in one process (interleaved), after one warm-up call
  each; the table shows the median over repeats and the speedup vs the uncached median.
* Efficiency: wall speedup / FLOPs speedup (1.0 = every saved FLOP turned into saved time).

* Peak memory: ``torch.cuda.max_memory_allocated`` over the timed calls of a method (CUDA only; on CPU
  the process's resident set cannot be reset per method, so the column is left empty). Cache and weight
  bytes come from ``cache_stats``.
* ``--compile``: FLOPs are counted eagerly, then the transformer is compiled (``Module.compile``); each method
  is compiled afresh (``torch._dynamo.reset()``), warmed up until two calls take the same time, then timed
  ``--repeats`` times, one method after the other (not interleaved: one method's compiled step kinds are
  what a user gets; every method's in one code cache would pass dynamo's recompile limit).

    python benchmarks/speed.py                          # DiT-XL/2 512 px, 20 steps, CPU fp32
    python benchmarks/speed.py --size cpu --models dit pixart-sigma flux wan-1.3b --repeats 2  # CPU variant
    python benchmarks/speed.py --models pixart-sigma flux wan-1.3b --device cuda --dtype bfloat16 --sdpa flash
    python benchmarks/speed.py --layers 4 --width 256 --heads 4 --repeats 2   # a quick DiT smoke run
    python benchmarks/speed.py --overhead --size cpu --layers 4 --latent-size 16 --steps 10 --repeats 7  # overhead
    python benchmarks/speed.py --size cpu-wide --models flux --steps 10 --methods duca-reuse budget-4 --unread-twins
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    WanTransformer3DModel,
)

from dualcache_diffusers import cache_stats, count_flops, disable_dual_cache, enable_dual_cache
from dualcache_diffusers.api import get_engine
from dualcache_diffusers.stats import weight_bytes

METHODS = {
    "uncached": None,
    "fora": dict(config="fora"),
    "fora-forecast": dict(config="fora", forecast_order=1),
    "toca": dict(config="toca"),
    "duca": dict(config="duca"),  # the preset forecasts (order 1)
    "duca-reuse": dict(config="duca", aggressive="reuse"),
    "duca-error": dict(config="duca", selection="forecast_error", forecast_reanchor=True),  # dual forecasting
    "budget-2": dict(budget=2),  # the default rule, as `enable_dual_cache(pipe, budget=2)`
    "budget-2.5": dict(budget=2.5),
    "budget-3": dict(budget=3),
    "budget-4": dict(budget=4),
}


@dataclass
class Bench:
    """One model at one size: the object the cache is enabled on and one generation of it."""

    name: str
    pipe: Any  # a diffusers pipeline, or a FlowLoop
    describe: str
    generate: Callable[[], torch.Tensor]


# ------------------------------------------------------------------------------------------------
# Model configs: the published ones (--size full) and a scaled-down variant (--size cpu)
# ------------------------------------------------------------------------------------------------
DIT_SIZES = {"full": dict(layers=28, width=1152, heads=16, latent_size=64),  # DiT-XL/2, 512 px
             "cpu": dict(layers=4, width=384, heads=6, latent_size=32),
             "cpu-wide": dict(layers=4, width=768, heads=12, latent_size=32)}


def build_pipeline(args: argparse.Namespace) -> DiTPipeline:
    torch.manual_seed(0)
    size = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in DIT_SIZES[args.size].items()}
    transformer = DiTTransformer2DModel(
        num_attention_heads=size["heads"],
        attention_head_dim=size["width"] // size["heads"],
        in_channels=4,
        out_channels=8,
        num_layers=size["layers"],
        sample_size=size["latent_size"],
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
    args.dit_size = size
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(32,),
        latent_channels=4,
        norm_num_groups=8,
    )
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    pipe.to(device=args.device, dtype=getattr(torch, args.dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe


SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}


def attention_backend(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """Pin PyTorch's SDPA to one kernel (e.g. flash): the call fails if any attention can't use it."""
    if args.sdpa is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[args.sdpa]))


def generate(pipe: DiTPipeline, args: argparse.Namespace) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(0)
    labels = list(range(args.batch))
    with attention_backend(args):
        return pipe(
            class_labels=labels,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=generator,
            output_type="pt",
        ).images


def dit_bench(args: argparse.Namespace) -> Bench:
    pipe = build_pipeline(args)
    s = args.dit_size
    describe = (f"DiT ({s['layers']} blocks, width {s['width']}, {(s['latent_size'] // 2) ** 2} tokens) in a stock "
                "DiTPipeline, DDIM")
    return Bench("dit", pipe, describe, lambda: generate(pipe, args))


class FlowLoop:
    """A transformer, a flow-matching scheduler and the inputs of one call: a pipeline's denoising loop."""

    def __init__(self, transformer: torch.nn.Module, latents: torch.Tensor, cond: dict[str, Any],
                 args: argparse.Namespace, out_channels: int | None = None) -> None:
        self.transformer = transformer
        self.scheduler = FlowMatchEulerDiscreteScheduler()
        self.latents, self.cond, self.args, self.out_channels = latents, cond, args, out_channels

    def __call__(self) -> torch.Tensor:
        """Denoise with CFG: the batch holds [uncond, cond] copies of the latents, as stock pipelines do."""
        args = self.args
        self.scheduler.set_timesteps(args.steps, device=self.latents.device)
        latents = self.latents.clone()
        with attention_backend(args):
            for t in self.scheduler.timesteps:
                batch = torch.cat([latents, latents])
                timestep = t.expand(batch.shape[0]).to(latents.dtype)
                out = self.transformer(hidden_states=batch, timestep=timestep, **self.cond, return_dict=False)[0]
                if self.out_channels is not None:  # learned sigma: keep the noise prediction
                    out = out[:, : self.out_channels]
                uncond, cond = out.chunk(2)
                latents = self.scheduler.step(uncond + args.guidance * (cond - uncond), t, latents).prev_sample
        return latents


def _to(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    return model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()


def _randn(args: argparse.Namespace, *shape: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=generator).to(device=args.device, dtype=getattr(torch, args.dtype))


PIXART_SIZES = {"full": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, sample_size=128,
                             caption_channels=4096, text=300),  # PixArt-Sigma XL, 1024 px: 4096 tokens
                "cpu": dict(num_layers=4, num_attention_heads=6, attention_head_dim=64, sample_size=32,
                            caption_channels=64, text=32),
                "cpu-wide": dict(num_layers=4, num_attention_heads=12, attention_head_dim=64, sample_size=32,
                                 caption_channels=64, text=32)}


def pixart_bench(args: argparse.Namespace) -> Bench:
    s = dict(PIXART_SIZES[args.size])
    text, width = s.pop("text"), s["num_attention_heads"] * s["attention_head_dim"]
    torch.manual_seed(0)
    model = _to(PixArtTransformer2DModel(
        **s, in_channels=4, out_channels=8, cross_attention_dim=width, patch_size=2, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True, activation_fn="gelu-approximate",
        use_additional_conditions=False, interpolation_scale=s["sample_size"] // 64 or 1), args)
    side = s["sample_size"]
    cond = dict(encoder_hidden_states=_randn(args, 2, text, s["caption_channels"]),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    loop = FlowLoop(model, _randn(args, 1, 4, side, side), cond, args, out_channels=4)
    describe = f"PixArt-Sigma ({s['num_layers']} blocks, width {width}, {(side // 2) ** 2} + {text} text tokens)"
    return Bench("pixart-sigma", loop, describe, loop)


FLUX_SIZES = {"full": dict(num_layers=19, num_single_layers=38, num_attention_heads=24, attention_head_dim=128,
                           joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56),
                           side=64, text=512),  # Flux.1, 1024 px: 4096 image + 512 text tokens
              "cpu": dict(num_layers=2, num_single_layers=4, num_attention_heads=4, attention_head_dim=64,
                          joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(8, 28, 28),
                          side=16, text=32),
              "cpu-wide": dict(num_layers=2, num_single_layers=4, num_attention_heads=6, attention_head_dim=128,
                               joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(16, 56, 56),
                               side=16, text=32)}


def flux_ids(side: int, text: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids as FluxPipeline makes them: (0, row, col) per image token, zeros for the text."""
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    return ids.reshape(side * side, 3).to(device), torch.zeros(text, 3, device=device)


def flux_bench(args: argparse.Namespace) -> Bench:
    s = dict(FLUX_SIZES[args.size])
    side, text = s.pop("side"), s.pop("text")
    torch.manual_seed(0)
    model = _to(FluxTransformer2DModel(**s, patch_size=1, in_channels=64, guidance_embeds=True), args)
    img_ids, txt_ids = flux_ids(side, text, args.device)
    cond = dict(encoder_hidden_states=_randn(args, 2, text, s["joint_attention_dim"]),
                pooled_projections=_randn(args, 2, s["pooled_projection_dim"]),
                guidance=torch.full((2,), 3.5, device=args.device), img_ids=img_ids, txt_ids=txt_ids)
    loop = FlowLoop(model, _randn(args, 1, side * side, 64), cond, args)
    describe = (f"Flux.1 ({s['num_layers']} + {s['num_single_layers']} blocks, width "
                f"{s['num_attention_heads'] * s['attention_head_dim']}, {side * side} + {text} text tokens)")
    return Bench("flux", loop, describe, loop)


WAN_SIZES = {"wan-1.3b": dict(num_layers=30, num_attention_heads=12, ffn_dim=8960),
             "wan-14b": dict(num_layers=40, num_attention_heads=40, ffn_dim=13824)}
WAN_CPU = {"cpu": dict(num_layers=4, num_attention_heads=4, attention_head_dim=64, ffn_dim=1024, text_dim=64,
                       latent=(5, 16, 16), text=32),
           "cpu-wide": dict(num_layers=4, num_attention_heads=6, attention_head_dim=128, ffn_dim=3072, text_dim=64,
                            latent=(5, 16, 16), text=32)}


def wan_bench(args: argparse.Namespace, name: str) -> Bench:
    if args.size in WAN_CPU:
        s = dict(WAN_CPU[args.size])
    else:  # Wan 2.1 at 832x480 x 81 frames: latents 21 x 60 x 104, 32,760 tokens
        s = dict(WAN_SIZES[name], attention_head_dim=128, text_dim=4096, latent=(21, 60, 104), text=512)
    latent, text = s.pop("latent"), s.pop("text")
    torch.manual_seed(0)
    model = _to(WanTransformer3DModel(**s, patch_size=(1, 2, 2), in_channels=16, out_channels=16, freq_dim=256,
                                      cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6), args)
    cond = dict(encoder_hidden_states=_randn(args, 2, text, s["text_dim"]))
    loop = FlowLoop(model, _randn(args, 1, 16, *latent), cond, args)
    tokens = latent[0] * (latent[1] // 2) * (latent[2] // 2)
    width = s["num_attention_heads"] * s["attention_head_dim"]
    describe = f"Wan 2.1 {name[4:]} ({s['num_layers']} blocks, width {width}, {tokens:,} + {text} text tokens)"
    return Bench(name, loop, describe, loop)


MODELS: dict[str, Callable[[argparse.Namespace], Bench]] = {
    "dit": dit_bench,
    "pixart-sigma": pixart_bench,
    "flux": flux_bench,
    "wan-1.3b": lambda args: wan_bench(args, "wan-1.3b"),
    "wan-14b": lambda args: wan_bench(args, "wan-14b"),
}


#: suffix of a method's twin with the engine's skipping of unread work switched off (``--unread-twins``)
UNREAD = "+unread"


def use_method(pipe: Any, name: str) -> None:
    disable_dual_cache(pipe)
    options = METHODS[name.removesuffix(UNREAD)]
    if options is not None:
        enable_dual_cache(pipe, **options)
        if name.endswith(UNREAD):  # every declared norm runs and every forecast is computed: the same images
            get_engine(pipe)._computes_nothing = lambda *_, **__: False


def timed_call(bench: Bench, args: argparse.Namespace) -> float:
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        bench.generate()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def warm_up_compiled(bench: Bench, args: argparse.Namespace, max_calls: int = 8) -> int:
    """Call until two calls in a row take the same time within 10% (dynamo compiles a method's step kinds over
    the first calls, some of them again with dynamic shapes); the calls made."""
    previous = timed_call(bench, args)
    for calls in range(2, max_calls + 1):
        seconds = timed_call(bench, args)
        if abs(seconds - previous) <= 0.1 * previous:
            return calls
        previous = seconds
    print(f"warning: {bench.name} call times still changing after {max_calls} warm-up calls", flush=True)
    return max_calls


def measure(bench: Bench, args: argparse.Namespace) -> list[dict]:
    pipe, methods, cuda = bench.pipe, args.methods, args.device.startswith("cuda")
    weights = weight_bytes([pipe.transformer]) / 2**20
    rows = {name: {"model": bench.name, "method": name, "times": [], "peak_bytes": 0, "weight_mib": weights}
            for name in methods}
    reference = None
    for name in methods:  # FLOPs (independent counter, eager) and the engine's analytic count
        use_method(pipe, name)
        with torch.inference_mode(), count_flops() as counter:
            images = bench.generate().float()
        rows[name]["flops"] = counter.get_total_flops()
        reference = images if reference is None else reference
        # a sanity check for low precision (NaN / inf would show here), not a quality measure: weights are random
        rows[name]["max_abs_diff"] = (images - reference).abs().max().item()
        if name != "uncached":
            stats = cache_stats(pipe)
            rows[name]["engine_flops"] = stats.flops
            rows[name]["pattern"] = "".join(k[0].upper() for k in stats.step_kinds)
            rows[name]["cache_mib"] = stats.cache_bytes / 2**20
    if args.compile:
        pipe.transformer.compile()

    def timed(name: str, switch: bool = True) -> None:
        if switch:
            use_method(pipe, name)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        rows[name]["times"].append(timed_call(bench, args))
        if cuda:
            rows[name]["peak_bytes"] = max(rows[name]["peak_bytes"], torch.cuda.max_memory_allocated())

    if args.compile:
        # One method at a time, each compiled afresh: a user runs one method, whose step kinds are a few
        # compiled variants; all methods' variants in one code cache would exceed dynamo's recompile limit.
        for name in methods:
            torch._dynamo.reset()
            use_method(pipe, name)
            warm_up_compiled(bench, args)
            for _ in range(args.repeats):  # the same engine: enabling the cache anew recompiles (new guards)
                timed(name, switch=False)
            print(f"{bench.name} {name}: " + "  ".join(f"{t:.2f}s" for t in rows[name]["times"]), flush=True)
    else:
        for name in methods:  # warm-up of every method
            use_method(pipe, name)
            timed_call(bench, args)
        for repeat in range(args.repeats):  # interleaved: every repeat times every method once
            for name in methods:
                timed(name)
            print(f"{bench.name} repeat {repeat + 1}/{args.repeats}: "
                  + "  ".join(f"{n} {rows[n]['times'][-1]:.2f}s" for n in methods), flush=True)
    disable_dual_cache(pipe)
    base = rows.get("uncached")
    for row in rows.values():
        row["median_s"] = statistics.median(row["times"])
        if base is not None:
            row["flops_speedup"] = base["flops"] / row["flops"]
            row["wall_speedup"] = base["median_s"] / row["median_s"]
            row["efficiency"] = row["wall_speedup"] / row["flops_speedup"]
    return list(rows.values())


def markdown(bench: Bench, rows: list[dict], args: argparse.Namespace) -> str:
    head = (
        f"{bench.describe}, random weights, {args.steps} steps, batch {args.batch} x CFG "
        f"(guidance {args.guidance}), {args.device} {args.dtype}, SDPA {args.sdpa or 'default'}, "
        f"{'compiled' if args.compile else 'eager'}, median of {args.repeats} "
        f"{'runs per method, each method compiled afresh' if args.compile else 'interleaved runs'}\n\n"
        "| method | step pattern | TFLOPs (counter) | engine vs counter | FLOPs speedup | median s | wall speedup "
        "| efficiency | peak memory GiB | cache MiB | weights MiB | max abs diff vs uncached |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        agree = f"{r['engine_flops'] / r['flops'] - 1:+.1%}" if "engine_flops" in r else "-"
        peak = f"{r['peak_bytes'] / 2**30:.2f}" if r["peak_bytes"] else "-"
        lines.append(
            f"| {r['method']} | {r.get('pattern', 'F' * args.steps)} | {r['flops'] / 1e12:.3f} | {agree} "
            f"| {r.get('flops_speedup', 1):.2f}x | {r['median_s']:.2f} | {r.get('wall_speedup', 1):.2f}x "
            f"| {r.get('efficiency', 1):.2f} | {peak} | {r.get('cache_mib', 0):.0f} | {r.get('weight_mib', 0):.0f} "
            f"| {r['max_abs_diff']:.3g} |"
        )
    return head + "\n".join(lines) + "\n"


def overhead(args: argparse.Namespace) -> str:
    """The engine's cost where it saves nothing: stock vs cache enabled at interval=1 (every step full) vs
    enabled then disabled (the hooks removed), interleaved. Wall time and this process's CPU time (steadier on
    a shared machine with one thread); the per-call difference is the engine's Python work per denoiser call."""
    benches = {name: dit_bench(args) for name in ("stock", "interval=1", "disabled")}  # same seed: same weights
    enable_dual_cache(benches["interval=1"].pipe, "duca", interval=1)
    enable_dual_cache(benches["disabled"].pipe, "duca", interval=1)
    timed_call(benches["disabled"], args)
    disable_dual_cache(benches["disabled"].pipe)

    def run(bench: Bench) -> tuple[float, float]:
        cpu = time.process_time()
        wall = timed_call(bench, args)
        return wall, time.process_time() - cpu

    for bench in benches.values():  # warm-up (and the engine's one FLOPs-counting call, at its first call)
        run(bench)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in benches}
    for _ in range(args.repeats):
        for name, bench in benches.items():
            times[name].append(run(bench))
    calls = args.steps  # CFG halves share one batched call per step
    base = [statistics.median(t[i] for t in times["stock"]) for i in (0, 1)]
    size = args.dit_size
    tokens = (size["latent_size"] // 2) ** 2
    lines = [
        f"engine overhead: DiT {size['layers']} blocks, width {size['width']}, {tokens} tokens, "
        f"{args.steps} steps, batch {args.batch} x CFG, {args.device} {args.dtype}, "
        f"torch threads {torch.get_num_threads()}, {args.repeats} interleaved runs: median, and the minimum "
        "(steadier where other processes share the machine)\n",
        "| setting | wall s | wall vs stock | CPU s | CPU vs stock | min CPU s | min CPU vs stock "
        "| min CPU ms per call vs stock |",
        "|---|---|---|---|---|---|---|---|",
    ]
    best = min(t[1] for t in times["stock"])
    for name, ts in times.items():
        wall, cpu = (statistics.median(t[i] for t in ts) for i in (0, 1))
        low = min(t[1] for t in ts)
        lines.append(f"| {name} | {wall:.3f} | {wall / base[0] - 1:+.2%} | {cpu:.3f} | {cpu / base[1] - 1:+.2%} "
                     f"| {low:.3f} | {low / best - 1:+.2%} | {(low - best) / calls * 1e3:+.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["dit"], choices=list(MODELS))
    parser.add_argument("--size", default="full", choices=["full", "cpu", "cpu-wide"],
                        help="full: the published configs at their usual resolution; cpu: scaled down; "
                             "cpu-wide: scaled down, width 768")
    parser.add_argument("--layers", type=int, default=None, help="DiT only: override the size's blocks")
    parser.add_argument("--width", type=int, default=None, help="DiT only")
    parser.add_argument("--heads", type=int, default=None, help="DiT only")
    parser.add_argument("--latent-size", type=int, default=None, help="DiT only: latent side; tokens = (side / 2)^2")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1, help="DiT only: images per call (CFG doubles the batch)")
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--sdpa", default=None, choices=list(SDPA_BACKENDS), help="pin the attention kernel")
    parser.add_argument("--compile", action="store_true", help="time the compiled transformer (FLOPs: eager)")
    parser.add_argument("--out", type=Path, default=None, help="write the tables (.md) and raw rows (.json) here")
    parser.add_argument("--unread-twins", action="store_true",
                        help=f"time each cached method also as METHOD{UNREAD}: the engine's skipping of work nothing "
                             "reads (the adapters' input_norms / sole_readers) switched off")
    parser.add_argument("--overhead", action="store_true",
                        help="only measure the engine's overhead (DiT): stock vs interval=1 (every step full) vs "
                             "disabled")
    args = parser.parse_args()
    if args.overhead:
        print(overhead(args))
        return
    if "uncached" not in args.methods:
        args.methods = ["uncached", *args.methods]
    if args.unread_twins:
        args.methods = [twin for name in args.methods
                        for twin in ([name] if name == "uncached" else [name, name + UNREAD])]
    tables, everything = [], []
    for name in args.models:
        bench = MODELS[name](args)
        rows = measure(bench, args)
        tables.append(markdown(bench, rows, args))
        print(tables[-1], flush=True)
        everything += rows
        del bench
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "speed.md").write_text("\n".join(tables))
        (args.out / "speed.json").write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
