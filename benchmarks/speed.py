#!/usr/bin/env python
"""Speed benchmark: FLOPs speedup, wall speedup and efficiency of FORA / ToCa / DuCa on a DiT pipeline.

A random-weight ``DiTTransformer2DModel`` of DiT-XL/2 size (28 blocks, width 1152, 256 tokens) in a stock
``DiTPipeline`` with a one-level VAE (so the decode costs next to nothing and the denoising loop is what is
timed). Random weights prove the mechanics and the cost, never quality.

* FLOPs: ``FlopCounterMode`` (``dualcache_diffusers.count_flops``) around one whole pipeline call per method;
  the engine's own analytic count is reported next to it.
* Wall: every repeat runs all methods back to back in one process (interleaved), after one warm-up call
  each; the table shows the median over repeats and the speedup vs the uncached median.
* Efficiency: wall speedup / FLOPs speedup (1.0 = every saved FLOP turned into saved time).

    python benchmarks/speed.py                          # DiT-XL/2 size, 20 steps, CPU fp32
    python benchmarks/speed.py --device cuda --dtype float16 --repeats 5
    python benchmarks/speed.py --layers 4 --width 256 --heads 4 --repeats 2   # a quick smoke run
    python benchmarks/speed.py --overhead --layers 4 --latent-size 16 --steps 10 --repeats 7   # engine overhead
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

from dualcache_diffusers import cache_stats, count_flops, disable_dual_cache, enable_dual_cache

METHODS = {
    "uncached": None,
    "fora": dict(config="fora"),
    "toca": dict(config="toca"),
    "duca": dict(config="duca"),
    "duca-reuse": dict(config="duca", aggressive="reuse"),
}


def build_pipeline(args: argparse.Namespace) -> DiTPipeline:
    torch.manual_seed(0)
    heads = args.heads
    transformer = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=args.width // heads,
        in_channels=4,
        out_channels=8,
        num_layers=args.layers,
        sample_size=args.latent_size,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
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


def use_method(pipe: DiTPipeline, name: str) -> None:
    disable_dual_cache(pipe)
    options = METHODS[name]
    if options is not None:
        enable_dual_cache(pipe, **options)


def timed_call(pipe: DiTPipeline, args: argparse.Namespace) -> float:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        generate(pipe, args)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(args: argparse.Namespace) -> list[dict]:
    pipe = build_pipeline(args)
    methods = args.methods
    rows = {name: {"method": name, "times": []} for name in methods}
    reference = None
    for name in methods:  # FLOPs (independent counter) and the engine's analytic count, plus a warm-up
        use_method(pipe, name)
        with torch.inference_mode(), count_flops() as counter:
            images = generate(pipe, args).float()
        rows[name]["flops"] = counter.get_total_flops()
        reference = images if reference is None else reference
        # a sanity check for low precision (NaN / inf would show here), not a quality measure: weights are random
        rows[name]["max_abs_diff"] = (images - reference).abs().max().item()
        if name != "uncached":
            stats = cache_stats(pipe)
            rows[name]["engine_flops"] = stats.flops
            rows[name]["pattern"] = "".join(k[0].upper() for k in stats.step_kinds)
            rows[name]["cache_mib"] = stats.cache_bytes / 2**20
        timed_call(pipe, args)
    for repeat in range(args.repeats):  # interleaved: every repeat times every method once
        for name in methods:
            use_method(pipe, name)
            rows[name]["times"].append(timed_call(pipe, args))
        print(f"repeat {repeat + 1}/{args.repeats}: " + "  ".join(f"{n} {rows[n]['times'][-1]:.2f}s" for n in methods))
    disable_dual_cache(pipe)
    base = rows.get("uncached")
    for row in rows.values():
        row["median_s"] = statistics.median(row["times"])
        if base is not None:
            row["flops_speedup"] = base["flops"] / row["flops"]
            row["wall_speedup"] = base["median_s"] / row["median_s"]
            row["efficiency"] = row["wall_speedup"] / row["flops_speedup"]
    return list(rows.values())


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    head = (
        f"DiT pipeline, random weights: {args.layers} blocks, width {args.width}, "
        f"{(args.latent_size // 2) ** 2} tokens, {args.steps} DDIM steps, batch {args.batch} x CFG "
        f"(guidance {args.guidance}), {args.device} {args.dtype}, SDPA {args.sdpa or 'default'}, "
        f"median of {args.repeats} interleaved runs\n\n"
        "| method | step pattern | TFLOPs (counter) | engine vs counter | FLOPs speedup | median s | wall speedup "
        "| efficiency | cache MiB | max abs diff vs uncached |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        agree = f"{r['engine_flops'] / r['flops'] - 1:+.1%}" if "engine_flops" in r else "-"
        lines.append(
            f"| {r['method']} | {r.get('pattern', 'F' * args.steps)} | {r['flops'] / 1e12:.3f} | {agree} "
            f"| {r.get('flops_speedup', 1):.2f}x | {r['median_s']:.2f} | {r.get('wall_speedup', 1):.2f}x "
            f"| {r.get('efficiency', 1):.2f} | {r.get('cache_mib', 0):.0f} | {r['max_abs_diff']:.3g} |"
        )
    return head + "\n".join(lines) + "\n"


def overhead(args: argparse.Namespace) -> str:
    """The engine's cost where it saves nothing: stock vs cache enabled at interval=1 (every step full) vs
    enabled then disabled (the hooks removed), interleaved. Wall time and this process's CPU time (steadier on
    a shared machine with one thread); the per-call difference is the engine's Python work per denoiser call."""
    pipes = {name: build_pipeline(args) for name in ("stock", "interval=1", "disabled")}  # same seed: same weights
    enable_dual_cache(pipes["interval=1"], "duca", interval=1)
    enable_dual_cache(pipes["disabled"], "duca", interval=1)
    timed_call(pipes["disabled"], args)
    disable_dual_cache(pipes["disabled"])

    def run(pipe) -> tuple[float, float]:
        cpu = time.process_time()
        wall = timed_call(pipe, args)
        return wall, time.process_time() - cpu

    for pipe in pipes.values():  # warm-up (and the engine's one FLOPs-counting call, at its first call)
        run(pipe)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in pipes}
    for _ in range(args.repeats):
        for name, pipe in pipes.items():
            times[name].append(run(pipe))
    calls = args.steps  # CFG halves share one batched call per step
    base = [statistics.median(t[i] for t in times["stock"]) for i in (0, 1)]
    lines = [
        f"engine overhead: DiT {args.layers} blocks, width {args.width}, {(args.latent_size // 2) ** 2} tokens, "
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
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--width", type=int, default=1152)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--latent-size", type=int, default=32, help="latent side; tokens = (side / 2)^2")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1, help="images per call (CFG doubles the batch)")
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--sdpa", default=None, choices=list(SDPA_BACKENDS), help="pin the attention kernel")
    parser.add_argument("--out", type=Path, default=None, help="write the table (.md) and raw rows (.json) here")
    parser.add_argument("--overhead", action="store_true",
                        help="only measure the engine's overhead: stock vs interval=1 (every step full) vs disabled")
    args = parser.parse_args()
    if args.overhead:
        print(overhead(args))
        return
    if "uncached" not in args.methods:
        args.methods = ["uncached", *args.methods]
    rows = measure(args)
    table = markdown(rows, args)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "speed.md").write_text(table)
        (args.out / "speed.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
