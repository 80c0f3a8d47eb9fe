#!/usr/bin/env python
"""Make the shipped PixArt digits pipeline work with ``PixArtAlphaPipeline``'s defaults (resolution binning).

diffusers' ``PixArtAlphaPipeline.__call__`` bins the requested size (default ``sample_size * vae_scale_factor``)
to one of PixArt-alpha's resolutions, which needs ``transformer.config.sample_size`` in {32, 64, 128}
(256 / 512 / 1024 px bins), generates at the bin and resizes the decoded image back to the requested size.
The digits transformer was trained on 16x16 latents (8x8 tokens of patch 2) that a 2x AutoencoderKL turns
into 32 px images. This script keeps the transformer weights and changes the rest so that the 256 px bin
lands on the same 16x16 latents:

* transformer config: ``sample_size`` 32 with ``interpolation_scale`` 2. ``PatchEmbed`` recomputes the
  sin-cos position embedding for the 8x8 token grid with ``base_size`` 16 and scale 2, which gives exactly
  the grid of the old config (``base_size`` 8, scale 1); the embedding buffer is not persistent.
* VAE: an ``AutoencoderTiny`` with 5 levels (``vae_scale_factor`` 16, 256 px <-> 16x16x4 latents) distilled
  from the 2x AutoencoderKL (``assets/dit-digits/vae``). The decoder computes a 32 px image with its
  trainable low-resolution levels and then only upsamples: its 64/128/256 px convolutions are fixed
  identities and its last convolution is pointwise, so ``decoder(z)`` is exactly the 32 px image
  upsampled 8x (nearest). The pipeline's bilinear 256 -> 32 resize reads the centre of each 8x8 block, so
  a call with ``height=width=32`` returns that 32 px image, which is trained to match the old decoder.
  The encoder averages 256 px down to 32 px with fixed [1, 2, 1] strided convolutions and is trained to
  match the old encoder's posterior mean there. ``scaling_factor`` is 1: the encoder emits the
  standardized latents the transformer was trained on (old posterior x old ``scaling_factor``).

Usage (CPU, one thread, a few minutes):

    python scripts/pixart_binning_vae.py [--asset-dir src/dualcache_diffusers/assets/pixart-digits]

It rewrites ``transformer/config.json`` and ``vae/`` of the asset in place (the transformer weights are not
touched) and prints the PSNR of the distilled decoder against the old one on generated latents.
``train_reference_models.py pixart`` runs it after training.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dualcache_diffusers.reference import digits
from dualcache_diffusers.reference.digits import DIT_DIGITS_DIR, PIXART_DIGITS_DIR

LEVELS = 5  # vae_scale_factor = 2 ** (LEVELS - 1) = 16
TRAINED_LEVELS = 2  # decoder levels at 16 and 32 px do the work; 64 / 128 / 256 px only upsample
CHANNELS = 8
DECODER_BLOCKS = (3, 4, 0, 0, 0)
ENCODER_BLOCKS = (0, 0, 0, 2, 2)
BLUR = torch.tensor([1.0, 2.0, 1.0]) / 4.0


def build_vae():  # -> AutoencoderTiny
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(
        in_channels=3,
        out_channels=3,
        encoder_block_out_channels=(CHANNELS,) * LEVELS,
        decoder_block_out_channels=(CHANNELS,) * LEVELS,
        num_encoder_blocks=ENCODER_BLOCKS,
        num_decoder_blocks=DECODER_BLOCKS,
        latent_channels=4,
        upsample_fn="nearest",
        upsampling_scaling_factor=2,
        scaling_factor=1.0,
        shift_factor=0.0,
    )


# ------------------------------------------------------------------------------- fixed layers / split


def _convs_after_upsample(decoder_layers: nn.Sequential) -> list[nn.Conv2d]:
    """The convolution following each ``nn.Upsample`` of a DecoderTiny, in order."""
    layers = list(decoder_layers)
    return [layers[i + 1] for i, m in enumerate(layers) if isinstance(m, nn.Upsample)]


@torch.no_grad()
def set_fixed_layers(vae) -> None:
    """Identity convolutions above 32 px in the decoder, blur-and-subsample ones below 32 px in the encoder."""
    for conv in _convs_after_upsample(vae.decoder.layers)[TRAINED_LEVELS - 1 :]:
        conv.weight.zero_()
        conv.weight[:, :, 1, 1] = torch.eye(CHANNELS)
        conv.requires_grad_(False)
    final = vae.decoder.layers[-1]
    center = final.weight[:, :, 1, 1].clone()
    final.weight.zero_()
    final.weight[:, :, 1, 1] = center
    enc = list(vae.encoder.layers)
    first, strided = enc[0], [m for m in enc if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    first.weight.zero_()
    first.bias.zero_()
    first.weight[0, :, 1, 1] = 1.0 / first.in_channels  # channel 0 = grey level in [0, 1]
    first.requires_grad_(False)
    for conv in strided[: LEVELS - TRAINED_LEVELS]:  # 256 -> 128 -> 64 -> 32 px
        conv.weight.zero_()
        conv.weight[0, 0] = torch.outer(BLUR, BLUR)
        conv.requires_grad_(False)


def _decoder_split(vae) -> int:
    """Index in ``decoder.layers`` of the upsampling that leaves 32 px."""
    ups = [i for i, m in enumerate(vae.decoder.layers) if isinstance(m, nn.Upsample)]
    return ups[TRAINED_LEVELS - 1]


def decode_32(vae, z: torch.Tensor) -> torch.Tensor:
    """What the decoder computes at 32 px, in [0, 1] (``vae.decode(z)`` is this upsampled 8x, mapped to [-1, 1])."""
    layers = vae.decoder.layers
    h = layers[: _decoder_split(vae)](torch.tanh(z / 3) * 3)
    final = layers[-1]
    return F.conv2d(h, final.weight[:, :, 1:2, 1:2], final.bias)


def _encoder_split(vae) -> int:
    """Index in ``encoder.layers`` just after the strided convolution that reaches 32 px."""
    strided = [i for i, m in enumerate(vae.encoder.layers) if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    return strided[LEVELS - TRAINED_LEVELS - 1] + 1


def blur_down(gray01: torch.Tensor, times: int) -> torch.Tensor:
    """The encoder's fixed part on a grey image [N, 1, H, W] in [0, 1]: ``times`` blur-and-subsample steps."""
    kernel = torch.outer(BLUR, BLUR)[None, None]
    for _ in range(times):
        gray01 = F.conv2d(gray01, kernel, stride=2, padding=1)
    return gray01


def encode_32(vae, gray32: torch.Tensor) -> torch.Tensor:
    """The encoder's trainable part on the 32 px output of its fixed part (channel 0, the rest zero)."""
    h = torch.cat([gray32, gray32.new_zeros(gray32.shape[0], CHANNELS - 1, *gray32.shape[-2:])], dim=1)
    return vae.encoder.layers[_encoder_split(vae) :](h)


# ------------------------------------------------------------------------------------------ distillation


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1]."""
    return 10 * math.log10(1.0 / F.mse_loss(a, b).item())


@torch.no_grad()
def teacher_data(old_vae, count: int, gen: torch.Generator):
    """Standardized latents of augmented train digits (posterior samples) with the old decoder's images in [0, 1]."""
    data = digits.load_digits_data("train")
    sf = old_vae.config.scaling_factor
    xs, zs, ims = [], [], []
    for _ in range(math.ceil(count / 256)):
        idx = torch.randint(len(data.labels), (256,), generator=gen)
        x = digits.augment(data.images[idx], gen).expand(-1, 3, -1, -1)
        dist = old_vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        xs.append(x)
        zs.append(z * sf)
        ims.append(old_vae.decode(z).sample.clamp(-1, 1) / 2 + 0.5)
    return torch.cat(xs)[:count], torch.cat(zs)[:count], torch.cat(ims)[:count]


@torch.no_grad()
def generated_latents(asset_dir: Path, old_vae, seeds: range, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents the shipped transformer generates (20 steps, default guidance) and the old decoder's images."""
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(asset_dir, vae=old_vae)  # 32 px <-> 16x16 latents, no binning
    pipe.set_progress_bar_config(disable=True)
    zs = []
    for seed in seeds:
        zs.append(
            pipe(
                prompt=prompts,
                height=32,
                width=32,
                num_inference_steps=20,
                generator=torch.Generator().manual_seed(seed),
                output_type="latent",
                use_resolution_binning=False,
                clean_caption=False,
                max_sequence_length=16,
            ).images
        )
    z = torch.cat(zs)
    return z, old_vae.decode(z / old_vae.config.scaling_factor).sample.clamp(-1, 1) / 2 + 0.5


@torch.no_grad()
def perturbed(old_vae, z: torch.Tensor, sigmas: tuple[float, ...], gen: torch.Generator):
    """Copies of generated latents with Gaussian noise of each ``sigma`` and the old decoder's images of them."""
    zs = torch.cat([z + sigma * torch.randn(z.shape, generator=gen) for sigma in sigmas])
    return zs, old_vae.decode(zs / old_vae.config.scaling_factor).sample.clamp(-1, 1) / 2 + 0.5


def distill(
    old_vae,
    vae,
    args: argparse.Namespace,
    generated: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """Train the decoder's 32 px part on data latents and (half of each batch) generated ones, the encoder's on data."""
    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()
    xs, zs, ims = teacher_data(old_vae, args.train_size, gen)
    zg, img = generated
    print(f"teacher data: {len(zs)} data latents, {len(zg)} generated ones in {time.time() - start:.0f}s")
    with torch.no_grad():
        enc_target = old_vae.encode(xs).latent_dist.mean * old_vae.config.scaling_factor
        up = (F.interpolate((x + 1) / 2, scale_factor=8, mode="bicubic").clamp(0, 1) for x in xs[:, :1].split(64))
        gray32 = torch.cat([blur_down(x256, 3) for x256 in up])
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    zv, imv = val
    for step in range(args.steps):
        idx = torch.randint(len(zs), (args.batch_size,), generator=gen)
        gdx = torch.randint(len(zg), (args.batch_size,), generator=gen)
        z, target = torch.cat([zs[idx], zg[gdx]]), torch.cat([ims[idx], img[gdx]])
        dec_loss = F.mse_loss(decode_32(vae, z), target)
        enc_loss = F.mse_loss(encode_32(vae, gray32[idx]), enc_target[idx])
        opt.zero_grad(set_to_none=True)
        (dec_loss + 0.01 * enc_loss).backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            with torch.no_grad():
                val_psnr = psnr(decode_32(vae, zv).clamp(0, 1), imv)
                train_psnr = psnr(decode_32(vae, zs[idx]).clamp(0, 1), ims[idx])
            print(
                f"step {step}: decoder PSNR train {train_psnr:.2f} dB, generated {val_psnr:.2f} dB; "
                f"encoder MSE {enc_loss.item():.4f}  ({time.time() - start:.0f}s)",
                flush=True,
            )


# ------------------------------------------------------------------------------------------------ export


def transformer_config_for_binning(config: dict) -> dict:
    """The transformer config whose 256 px bin gives the trained 16x16 latents and position embedding.

    With ``sample_size`` s and ``interpolation_scale`` k, PatchEmbed places token i of an n-token row at
    ``i / (n / (s / patch)) / k``; ``sample_size`` 32 keeps the trained positions when k grows by 32 / s.
    """
    if config["sample_size"] == 32:
        return dict(config)
    trained, scale = config["sample_size"], config["interpolation_scale"]
    scale = scale if scale is not None else max(trained // 64, 1)  # PixArtTransformer2DModel's default
    new_scale = scale * 32 / trained
    return {**config, "sample_size": 32, "interpolation_scale": int(new_scale) if new_scale.is_integer() else new_scale}


def convert(asset_dir: Path, args: argparse.Namespace) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    old_vae = AutoencoderKL.from_pretrained(args.old_vae_dir).eval().requires_grad_(False)
    prompts = [digits.caption_for(d, adj) for d in range(10) for adj in ((), ("thick",))]
    val = generated_latents(asset_dir, old_vae, range(1000, 1001), prompts)  # 20 prompts, one seed each
    z, _ = generated_latents(asset_dir, old_vae, range(args.generated_seeds), prompts)
    generated = perturbed(old_vae, z, (0.0, 0.05, 0.1, 0.2), torch.Generator().manual_seed(args.seed))
    vae = build_vae()
    set_fixed_layers(vae)
    distill(old_vae, vae, args, generated, val)
    vae.eval().requires_grad_(True)
    set_fixed_layers(vae)  # zero the off-centre taps of the final convolution (untrained)
    with torch.no_grad():
        z, target = val
        full = vae.decode(z).sample
        small = F.interpolate(full, size=(32, 32), mode="bilinear", align_corners=False) / 2 + 0.5
        value = psnr(small.clamp(0, 1), target)
        print(f"decode {tuple(z.shape)} -> {tuple(full.shape)}; 32 px PSNR vs old decoder {value:.2f} dB")
    vae.save_pretrained(asset_dir / "vae", safe_serialization=True)
    path = asset_dir / "transformer" / "config.json"
    config = transformer_config_for_binning(json.loads(path.read_text()))
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    index_path = asset_dir / "model_index.json"
    index = json.loads(index_path.read_text())
    index["vae"] = ["diffusers", "AutoencoderTiny"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    print(f"wrote {asset_dir / 'vae'}, {path}, {index_path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--asset-dir", type=Path, default=PIXART_DIGITS_DIR)
    parser.add_argument("--old-vae-dir", type=Path, default=DIT_DIGITS_DIR / "vae")
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--generated-seeds", type=int, default=8, help="seeds x 20 prompts of generated latents")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-size", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    convert(args.asset_dir, args)


if __name__ == "__main__":
    main()
