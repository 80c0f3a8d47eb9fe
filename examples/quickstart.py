"""Quickstart: one line turns dual caching on for a stock diffusers pipeline.

    python examples/quickstart.py                       # the shipped digits DiT, offline, CPU
    python examples/quickstart.py --model pixart        # the shipped digits PixArt-alpha (text to image)
    python examples/quickstart.py --model PixArt-alpha/PixArt-XL-2-512x512 --device cuda --dtype float16 \
        --prompt "an astronaut riding a horse"

Images go to ``--out`` (default: ./outputs/quickstart).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from dualcache_diffusers import cache_stats, disable_dual_cache, enable_dual_cache
from dualcache_diffusers.bench import resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="dit", help="'dit' / 'pixart' (shipped), a pipeline directory or Hub id")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="dtype")
    parser.add_argument("--prompt", default="a thick seven", help="text-to-image pipelines only")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--out", type=Path, default=Path("outputs") / "quickstart", help="folder for the PNGs")
    args = parser.parse_args()

    pipe = DiffusionPipeline.from_pretrained(resolve_model(args.model), torch_dtype=getattr(torch, args.dtype))
    pipe = pipe.to(args.device)
    is_dit = hasattr(pipe, "get_label_ids")
    # the plain stock call; the shipped PixArt generates at its 256 px resolution bin (its 32 px images upsampled)
    # and returns 512 px images by default (pass height=32, width=32 for its own size)
    inputs = dict(class_labels=[3, 7]) if is_dit else dict(prompt=[args.prompt])

    def run():
        return pipe(**inputs, num_inference_steps=args.steps, generator=torch.manual_seed(0)).images

    stock = run()
    enable_dual_cache(pipe)  # the DuCa preset of the model's family
    cached = run()
    print(cache_stats(pipe).summary())
    disable_dual_cache(pipe)  # back to stock diffusers, bit for bit
    args.out.mkdir(parents=True, exist_ok=True)
    for i, (a, b) in enumerate(zip(stock, cached)):
        a.save(args.out / f"stock_{i}.png")
        b.save(args.out / f"duca_{i}.png")
    print(f"wrote {args.out}/stock_*.png and {args.out}/duca_*.png")


if __name__ == "__main__":
    main()
