#!/usr/bin/env python
"""Train (and verify) the moving-digits video reference pipeline shipped in ``assets/video-digits``.

A ``LattePipeline``: ``LatteTransformer3DModel`` (interleaved spatial and temporal blocks) on the digits
VAE's latents, applied per frame, with the PixArt digits T5 text encoder extended by the motion words
and trained jointly. Data: ``reference/moving_digits.py`` (8 frames of 32x32, a 20px digit drifting
left/right/up/down, captions like "a seven moving left").

    python scripts/train_video_model.py train --threads 1    # -> assets/video-digits
    python scripts/train_video_model.py verify --threads 1   # quality numbers, docs/video_samples.gif

Shares the diffusion loop, EMA, schedules and VAE loading with ``train_reference_models.py``.
The VAE comes from ``--vae-dir`` (default ``runs/reference/vae``; falls back to the shipped one) and the
text encoder to start from from ``assets/pixart-digits/text_encoder``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_reference_models as ref

from dualcache_diffusers.reference import digits, moving_digits
from dualcache_diffusers.reference.moving_digits import LATTE_CALL_KWARGS, VIDEO_DIGITS_DIR

# LattePipeline.encode_prompt pads every prompt to 120 tokens, whatever the tokenizer's own limit.
PIPELINE_MAX_LENGTH = 120
# Transformer: 4 spatial + 4 temporal blocks of width 64.
HEADS, HEAD_DIM, NUM_LAYERS = 4, 16, 4
DEFAULT_STEPS = 3600
# How LattePipeline hands text to the transformer (never with an attention mask):
#   "full":      mask_feature=False -> all 120 T5 outputs for prompt and negative prompt (any batch size);
#   "truncated": one prompt and one clip, mask_feature=True (the default) -> the caption tokens only, the
#                negative prompt cut to the same length;
#   "masked":    several clips, mask_feature=True -> 120 positions with the padding zeroed, negative unmasked.
# Training draws "full" or "truncated" per step. "masked" is left out: 115 of its 120 keys are the same
# zero vector, which drowned the caption in a first run (the model learned to ignore the text), so the
# recommended call kwargs set mask_feature=False.
TEXT_FORMATS = ("full", "truncated")


def build_transformer(caption_channels: int):  # -> LatteTransformer3DModel
    from diffusers import LatteTransformer3DModel

    return LatteTransformer3DModel(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=ref.LATENT_CHANNELS,
        # LattePipeline keeps the first half of the output channels (the other half is a learned-variance slot
        # the pipeline discards), so the model must emit twice the latent channels; the second half is unused.
        out_channels=2 * ref.LATENT_CHANNELS,
        num_layers=NUM_LAYERS,
        cross_attention_dim=HEADS * HEAD_DIM,
        attention_bias=True,
        sample_size=ref.LATENT_SIZE,
        patch_size=2,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=ref.TRAIN_TIMESTEPS,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=caption_channels,
        video_length=moving_digits.NUM_FRAMES,
    )


# The PixArt digits transformer's blocks that initialise the spatial blocks (first and last two of its six).
PIXART_SOURCE_BLOCKS = (0, 1, 4, 5)


@torch.no_grad()
def init_from_pixart(model) -> None:
    """Start the Latte transformer from the shipped PixArt digits transformer (same width, heads, patch size,
    caption width): patch embedding, timestep and caption embedders, final modulation and the first half of the
    output projection, the spatial blocks from ``PIXART_SOURCE_BLOCKS``; the temporal blocks start as the
    identity (their attention and MLP output projections zeroed), so at step 0 every frame is denoised by the
    still-digit model and training adds the motion."""
    from diffusers import PixArtTransformer2DModel

    pixart = PixArtTransformer2DModel.from_pretrained(digits.PIXART_DIGITS_DIR / "transformer").float()
    source = pixart.state_dict()
    block_map = {f"transformer_blocks.{i}.": f"transformer_blocks.{j}." for i, j in enumerate(PIXART_SOURCE_BLOCKS)}
    for name, tensor in model.state_dict().items():
        if name.startswith("temporal_transformer_blocks."):
            if ".attn1.to_out.0." in name or ".ff.net.2." in name:
                tensor.zero_()
            continue
        key = next((src + name[len(dst):] for dst, src in block_map.items() if name.startswith(dst)), name)
        if key not in source:
            continue
        if name.startswith("proj_out."):  # rows (p, p, channel): copy the latent channels, leave the unused half
            p = model.config.patch_size
            tensor.view(p, p, 2, -1)[:, :, 0].copy_(source[key].view(p, p, 1, -1)[:, :, 0])
        else:
            tensor.copy_(source[key])


def load_text_encoder(tokenizer):  # -> T5EncoderModel
    """The PixArt digits T5 with embedding rows appended for the motion words (same ids for the old words)."""
    from transformers import T5EncoderModel

    encoder = T5EncoderModel.from_pretrained(digits.PIXART_DIGITS_DIR / "text_encoder")
    old = encoder.get_input_embeddings().weight.shape[0]
    encoder.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():  # new rows: small random vectors at the scale of the trained ones
        weight = encoder.get_input_embeddings().weight
        weight[old:] = torch.randn(len(tokenizer) - old, weight.shape[1]) * weight[:old].std()
    return encoder


@torch.no_grad()
def encode_clips(vae, clips: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame posterior mean/std of clips [N, F, 1, H, W], laid out [N, C, F * h, w] (4-D, so the shared
    diffusion loop, which averages the loss over dims 1-3, works unchanged)."""
    n, f = clips.shape[:2]
    mean, std = ref.encode_dataset(vae, clips.flatten(0, 1))  # [N * F, C, h, w]

    def layout(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(n, f, *x.shape[1:]).permute(0, 2, 1, 3, 4)  # [N, C, F, h, w]
        return x.reshape(n, x.shape[1], f * x.shape[3], x.shape[4]).contiguous()

    return layout(mean), layout(std)


def train(args: argparse.Namespace) -> None:
    """Latte + T5 trained jointly on moving digits -> LattePipeline in assets/video-digits."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, LattePipeline

    gen = ref.seed_everything(args.seed)
    vae = AutoencoderKL.from_pretrained(ref.resolve_vae_dir(Path(args.vae_dir))).eval()
    start = time.time()
    data = moving_digits.training_clips("train", seed=args.seed)
    latents = encode_clips(vae, data.clips)
    print(f"{len(data.labels)} training clips encoded in {time.time() - start:.0f}s; latents {tuple(latents[0].shape)}")
    clip_captions = data.captions
    del data  # the rendered frames are no longer needed
    scaling_factor = vae.config.scaling_factor
    if args.unit_latents:  # rescale the latents to unit std (the video pipeline's copy of the VAE carries the factor)
        scaling_factor /= float((latents[0] * scaling_factor).std())
        vae.register_to_config(scaling_factor=scaling_factor)
    print(f"latent scaling factor {scaling_factor:.4f}")

    tokenizer = moving_digits.build_caption_tokenizer()
    text_encoder = load_text_encoder(tokenizer).train()
    model = build_transformer(text_encoder.config.d_model).train()
    if args.init == "pixart":
        init_from_pixart(model)
    elif args.init != "random":  # continue from a saved video pipeline (its transformer and text encoder)
        from diffusers import LatteTransformer3DModel
        from transformers import T5EncoderModel

        model = LatteTransformer3DModel.from_pretrained(Path(args.init) / "transformer").float().train()
        text_encoder = T5EncoderModel.from_pretrained(Path(args.init) / "text_encoder").float().train()
    captions = ["", *sorted(set(clip_captions))]
    index = {c: i for i, c in enumerate(captions)}
    caption_idx = torch.tensor([index[c] for c in clip_captions])
    enc = tokenizer(captions, padding="max_length", max_length=PIPELINE_MAX_LENGTH, return_tensors="pt")
    ids, mask = enc.input_ids, enc.attention_mask
    lengths = set(mask[1:].sum(dim=1).tolist())
    if len(lengths) != 1:
        raise RuntimeError(f"captions tokenize to different lengths {lengths}; the 'truncated' format needs one")
    caption_len = lengths.pop()
    frames, lat_h = moving_digits.NUM_FRAMES, ref.LATENT_SIZE
    print(
        f"Latte params: {ref.param_count(model)}  T5 params: {ref.param_count(text_encoder)}  vocab {len(tokenizer)}  "
        f"captions {len(captions) - 1} ({caption_len} tokens) e.g. {captions[1:3]}  tokens/frame {(lat_h // 2) ** 2}"
    )

    def predict(noisy: torch.Tensor, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        cap = caption_idx[idx].clone()
        cap[torch.rand(len(idx), generator=gen) < args.cond_dropout] = 0  # "" = the negative prompt
        fmt = TEXT_FORMATS[int(torch.randint(len(TEXT_FORMATS), (1,), generator=gen))]
        rows = torch.cat([cap, torch.zeros(1, dtype=torch.long)])  # the batch's captions, then ""
        emb = text_encoder(ids[rows], attention_mask=mask[rows]).last_hidden_state
        emb, negative = emb[:-1], emb[-1:].expand(len(idx), -1, -1)
        if fmt == "truncated":
            emb, negative = emb[:, :caption_len], negative[:, :caption_len]
        # Dropped captions get the negative prompt exactly as the pipeline builds it in this format.
        emb = torch.where((cap == 0)[:, None, None], negative, emb)
        b, c = noisy.shape[:2]
        video = noisy.reshape(b, c, frames, lat_h, -1)
        out = model(video, timestep=t, encoder_hidden_states=emb).sample[:, : ref.LATENT_CHANNELS]
        return out.reshape(noisy.shape)

    scheduler = DPMSolverMultistepScheduler(**ref.BETA_KWARGS, prediction_type=args.prediction_type)
    out_dir = Path(args.out_dir)

    def save(transformer, text, path: Path) -> None:
        pipe = LattePipeline(
            tokenizer=tokenizer, text_encoder=text, vae=vae, transformer=transformer.half(), scheduler=scheduler
        )
        ref.save_text_pipeline(pipe, path)

    def checkpoint(step: int, emas: list[torch.nn.Module]) -> None:
        if args.save_every and step % args.save_every == 0 and step < (args.steps or DEFAULT_STEPS):
            save(copy.deepcopy(emas[0]), emas[1], out_dir.with_name(f"{out_dir.name}-step{step}"))

    (ema, ema_text), loss, wall = ref.train_diffusion(
        "video", [model, text_encoder], predict, latents, scaling_factor, args, gen,
        default_steps=DEFAULT_STEPS, prediction_type=args.prediction_type, on_step=checkpoint,
    )
    save(ema, ema_text, out_dir)
    print(f"[video] final loss {loss:.4f}  wall {wall:.0f}s  saved {out_dir} ({ref.dir_size_mb(out_dir):.2f} MB)")


def verify(args: argparse.Namespace) -> None:
    """Generate clips for every (digit, direction), measure digit and motion accuracy, write the GIF and grid."""
    from diffusers import LattePipeline

    from dualcache_diffusers import video

    classifier = digits.DigitsClassifier.from_pretrained(args.classifier_dir)
    real = moving_digits.evaluation_clips("test", per_pair=2, seed=args.seed)
    real_q = moving_digits.clip_quality(classifier, (real.clips[:, :, 0] + 1) / 2, real.labels, real.directions)
    results: dict[str, object] = {"real_test_clips": real_q.__dict__}
    print(f"[verify] real test clips: {real_q}")

    pipe = LattePipeline.from_pretrained(args.out_dir)
    pipe.set_progress_bar_config(disable=True)
    pairs = [(d, k) for d in range(digits.NUM_CLASSES) for k in range(len(moving_digits.DIRECTIONS))]
    prompts = [moving_digits.caption_for(d, moving_digits.DIRECTIONS[k]) for d, k in pairs]
    n = args.per_prompt
    for scale in args.guidance:
        start = time.time()
        clips = []
        for i in range(0, len(prompts), args.prompt_batch):
            out = pipe(
                prompt=prompts[i : i + args.prompt_batch],
                num_images_per_prompt=n,
                num_inference_steps=args.inference_steps,
                guidance_scale=scale,
                generator=torch.Generator().manual_seed(args.seed + i),
                output_type="pt",
                **LATTE_CALL_KWARGS,
            ).frames
            clips.append(out)
        clips = torch.cat(clips)  # [P * n, F, 3, H, W]
        labels = [d for d, _ in pairs for _ in range(n)]
        dirs = [k for _, k in pairs for _ in range(n)]
        clips01 = moving_digits.as_clip_tensor(clips)
        q = moving_digits.clip_quality(classifier, clips01, labels, dirs)
        seconds = time.time() - start
        results[f"cfg{scale}"] = {**q.__dict__, "clips": len(labels), "seconds": seconds}
        print(f"[verify] cfg {scale}: {q}  ({len(labels)} clips, {seconds:.0f}s)")
        if scale == args.guidance[0]:
            # The still grid: one row per clip, one column per frame; the left and up clips of every digit.
            shown = [i * n for i, (_, k) in enumerate(pairs) if k in (0, 2)]
            video.frame_strip_grid(clips[shown], scale=3).save(ref.DOCS_DIR / "samples_video.png")
            # The GIF: all four directions of 1, 3 and 7, and two more.
            gif_idx = [i * n for i, (d, k) in enumerate(pairs) if d in (1, 3, 7) or (d, k) in ((0, 0), (8, 3))]
            path = video.save_gif(clips[gif_idx], ref.DOCS_DIR / "video_samples.gif", ncols=7, fps=4, scale=2)
            print(f"[verify] wrote {path} ({path.stat().st_size / 1024:.0f} KB) and docs/samples_video.png")
    # One prompt per call with the default mask_feature=True: the pipeline's other text path (caption tokens only).
    start = time.time()
    single = torch.cat(
        [
            pipe(
                prompt=prompt,
                num_inference_steps=args.inference_steps,
                guidance_scale=args.guidance[0],
                generator=torch.Generator().manual_seed(args.seed + i),
                output_type="pt",
                **{**LATTE_CALL_KWARGS, "mask_feature": True},
            ).frames
            for i, prompt in enumerate(prompts)
        ]
    )
    q = moving_digits.clip_quality(
        classifier, moving_digits.as_clip_tensor(single), [d for d, _ in pairs], [k for _, k in pairs]
    )
    results[f"cfg{args.guidance[0]}_one_prompt_per_call"] = {
        **q.__dict__,
        "clips": len(pairs),
        "seconds": time.time() - start,
    }
    print(f"[verify] one prompt per call, cfg {args.guidance[0]}: {q}")
    results["size_mb"] = round(ref.dir_size_mb(Path(args.out_dir)), 2)
    out = Path(args.work_dir) / "verify_video.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"[verify] {json.dumps(results)}\nwrote {out}")


STAGES = {"train": train, "verify": verify}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=[*STAGES, "all"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 3600)")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per step")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction"])
    parser.add_argument("--unit-latents", action="store_true",
                        help="rescale the latents to unit std over the training clips (default: the VAE's factor)")
    parser.add_argument("--init", default="random",
                        help="'random', 'pixart' (start from the PixArt digits transformer) or a saved video "
                             "pipeline directory to continue from")
    parser.add_argument("--save-every", type=int, default=0, help="also save the EMA pipeline every N steps")
    parser.add_argument("--cond-dropout", type=float, default=0.1, help="caption dropout for CFG")
    parser.add_argument("--work-dir", default=str(ref.DEFAULT_WORK_DIR))
    parser.add_argument("--vae-dir", default=str(ref.DEFAULT_WORK_DIR / "vae"))
    parser.add_argument("--out-dir", default=str(VIDEO_DIGITS_DIR), help="where the pipeline is saved / read")
    parser.add_argument("--classifier-dir", default=str(digits.CLASSIFIER_DIR))
    parser.add_argument("--per-prompt", type=int, default=2, help="verify: clips per (digit, direction)")
    parser.add_argument("--prompt-batch", type=int, default=8, help="verify: prompts per pipeline call")
    parser.add_argument("--inference-steps", type=int, default=20, help="verify: denoising steps")
    parser.add_argument("--guidance", type=float, nargs="+", default=[4.0], help="verify: CFG scales")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in STAGES if args.stage == "all" else [args.stage]:
        start = time.time()
        STAGES[name](args)
        print(f"== stage {name} done in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
