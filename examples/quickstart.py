"""Quickstart: one line turns dual caching on for a stock diffusers pipeline.

    python examples/quickstart.py                       # the shipped digits DiT, offline, CPU
    python examples/quickstart.py --model PixArt-alpha/PixArt-XL-2-512x512 --device cuda --dtype float16 \
        --prompt "an astronaut riding a horse"
"""

from __future__ import annotations

import argparse

import torch
from diffusers import DiffusionPipeline

from dualcache_diffusers import cache_stats, disable_dual_cache, enable_dual_cache
from dualcache_diffusers.reference.digits import DIT_DIGITS_DIR


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(DIT_DIGITS_DIR))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompt", default="a thick seven", help="PixArt pipelines only")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype)).to(args.device)
    is_dit = hasattr(pipe, "get_label_ids")
    inputs = dict(class_labels=[3, 7]) if is_dit else dict(prompt=[args.prompt])

    def run():
        return pipe(**inputs, num_inference_steps=args.steps, generator=torch.manual_seed(0)).images

    stock = run()
    enable_dual_cache(pipe)  # the DuCa preset of the model's family
    cached = run()
    print(cache_stats(pipe).summary())
    disable_dual_cache(pipe)  # back to stock diffusers, bit for bit
    for i, (a, b) in enumerate(zip(stock, cached)):
        a.save(f"stock_{i}.png")
        b.save(f"duca_{i}.png")
    print("wrote stock_*.png and duca_*.png")


if __name__ == "__main__":
    main()
