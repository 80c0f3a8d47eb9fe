#!/usr/bin/env python
"""Compare the binning-ready PixArt digits asset with the previous one (2x AutoencoderKL, no binning).

    python scripts/pixart_binning_check.py NEW_ASSET_DIR [OLD_ASSET_DIR]

Prints the 32 px PSNR (uint8) of old vs new images on 20 captions x seeds, whether
``max_sequence_length`` 120 changes the images, and whole-call / decode times (one thread).
"""

import sys
import time

import numpy as np
import torch
from diffusers import PixArtAlphaPipeline

from dualcache_diffusers.reference import digits

OLD_KWARGS = {"use_resolution_binning": False, "clean_caption": False, "max_sequence_length": 16}
PROMPTS = [digits.caption_for(d, adj) for d in range(10) for adj in (("thin",), ("slanted",))]


def load(path: str) -> PixArtAlphaPipeline:
    pipe = PixArtAlphaPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe: PixArtAlphaPipeline, **kwargs) -> np.ndarray:
    gens = [torch.Generator().manual_seed(2000 + i) for i in range(len(PROMPTS))]
    return np.stack([np.asarray(im, dtype=np.float64) for im in pipe(prompt=PROMPTS, generator=gens, **kwargs).images])


def timings(name: str, pipe: PixArtAlphaPipeline, kwargs: dict) -> None:
    prompts, calls, decodes = PROMPTS[:8], [], []
    for _ in range(2):
        start = time.perf_counter()
        pipe(prompt=prompts, generator=torch.Generator().manual_seed(0), **kwargs)
        calls.append(time.perf_counter() - start)
    z = pipe(prompt=prompts, generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs).images
    with torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            pipe.vae.decode(z / pipe.vae.config.scaling_factor)
            decodes.append(time.perf_counter() - start)
    print(f"{name}: whole call (8 images, 20 steps) {min(calls):.2f} s; vae.decode of 8 {min(decodes) * 1000:.0f} ms")


def main() -> None:
    torch.set_num_threads(1)
    new, old = load(sys.argv[1]), load(sys.argv[2] if len(sys.argv) > 2 else "/tmp/pixart/old_asset")
    a, b = images(old, **OLD_KWARGS), images(new, **digits.PIXART_CALL_KWARGS)
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    per_image = 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12))
    print(
        f"32 px uint8 PSNR old vs new, {len(a)} caption+seed pairs: {10 * np.log10(255**2 / mse.mean()):.2f} dB; "
        f"per image min {per_image.min():.2f} median {np.median(per_image):.2f} max {per_image.max():.2f}; "
        f"max difference {np.abs(a - b).max():.0f}/255"
    )
    c = images(new, height=32, width=32, clean_caption=False)
    print(f"max_sequence_length 120 vs 16: max difference {np.abs(b - c).max():.0f}/255")
    timings("old 32 px", old, OLD_KWARGS)
    timings("new 32 px", new, digits.PIXART_CALL_KWARGS)
    timings("new defaults (512 px)", new, {"clean_caption": False, "max_sequence_length": 16})


if __name__ == "__main__":
    main()
