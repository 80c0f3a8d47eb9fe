#!/usr/bin/env python
"""Train (and verify) the digits reference models shipped in ``src/dualcache_diffusers/assets``.

Stages, run in this order (``all`` runs every stage; each prints its final losses and wall time):

    python scripts/train_reference_models.py vae         # AutoencoderKL 3x32x32 <-> 4x16x16  -> runs/reference/vae
    python scripts/train_reference_models.py classifier  # digits CNN          -> assets/digits-classifier
    python scripts/train_reference_models.py dit         # class-conditional   -> assets/dit-digits
    python scripts/train_reference_models.py pixart      # text-conditional    -> assets/pixart-digits
                                                         # (then pixart_binning_vae.py: 16x VAE for binning)
    python scripts/train_reference_models.py verify      # sample, classify, docs/samples_{dit,pixart}.png

The shipped assets were made with ``--threads 2`` for ``vae`` and ``--threads 1`` for the other stages
(``dit`` and ``pixart`` ran side by side); see ``docs/reference_models.md`` for times and results.

``dit`` and ``pixart`` read the VAE from ``--vae-dir`` (default ``runs/reference/vae``; when that is
missing they fall back to the VAE already shipped in ``assets/dit-digits/vae``). Everything uses a
fixed seed; the transformers are stored as fp16 safetensors (diffusers upcasts to fp32 on load),
VAE, text encoder and classifier as fp32.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dualcache_diffusers.reference import digits
from dualcache_diffusers.reference.digits import (
    CLASSIFIER_DIR,
    DIT_DIGITS_DIR,
    DIT_NULL_CLASS,
    PIXART_CALL_KWARGS,
    PIXART_DIGITS_DIR,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORK_DIR = REPO_ROOT / "runs" / "reference"
DOCS_DIR = REPO_ROOT / "docs"

LATENT_CHANNELS = 4
LATENT_SIZE = 16  # 32x32 images, VAE downsamples by 2; patch size 2 -> 8x8 = 64 tokens
TRAIN_TIMESTEPS = 1000
# Transformer size (both models): 6 blocks of width 64 keep a CPU training run well under 30 minutes.
HEADS, HEAD_DIM, NUM_LAYERS = 4, 16, 6
BETA_KWARGS = {"num_train_timesteps": TRAIN_TIMESTEPS, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


# ------------------------------------------------------------------------------------------ helpers


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch/numpy and return a CPU generator for data sampling."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    return torch.Generator().manual_seed(seed)


def lr_factor(step: int, total: int, warmup: int = 100, floor: float = 0.1) -> float:
    """Linear warmup then cosine decay to ``floor`` of the base learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a module's parameters (the shipped weights)."""

    def __init__(self, module: torch.nn.Module, decay: float = 0.998) -> None:
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for ema_p, p in zip(self.module.parameters(), module.parameters(), strict=True):
            ema_p.lerp_(p, 1.0 - decay)


class RunningLoss:
    """Smoothed loss for the progress bar and the final report."""

    def __init__(self, momentum: float = 0.98) -> None:
        self.value: float | None = None
        self.momentum = momentum

    def update(self, loss: float) -> float:
        self.value = loss if self.value is None else self.momentum * self.value + (1 - self.momentum) * loss
        return self.value


def param_count(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f}M"


def dir_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def resolve_vae_dir(vae_dir: Path) -> Path:
    """The freshly trained VAE if present, else the one shipped with the DiT pipeline."""
    if (vae_dir / "config.json").exists():
        return vae_dir
    shipped = DIT_DIGITS_DIR / "vae"
    if (shipped / "config.json").exists():
        print(f"{vae_dir} not found; using shipped VAE {shipped}")
        return shipped
    raise FileNotFoundError(f"no VAE at {vae_dir}; run the 'vae' stage first")


# ---------------------------------------------------------------------------------------------- VAE


def build_vae():  # -> AutoencoderKL
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=digits.IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def train_vae(args: argparse.Namespace) -> None:
    """Train the AutoencoderKL with reconstruction MSE + a small KL, then set ``scaling_factor``."""
    gen = seed_everything(args.seed)
    data = digits.load_digits_data("train")
    test = digits.load_digits_data("test")
    vae = build_vae().train()
    print(f"VAE params: {param_count(vae)}")
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr or 1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.steps or 300))
    steps, bs, kl_weight = args.steps or 300, args.batch_size or 64, 1e-4
    rec_avg, kl_avg = RunningLoss(), RunningLoss()
    start = time.time()
    for _ in (bar := tqdm(range(steps), desc="vae")):
        idx = torch.randint(len(data.labels), (bs,), generator=gen)
        x = digits.augment(data.images[idx], gen).expand(-1, 3, -1, -1)
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(gen)).sample
        rec_loss = F.mse_loss(rec, x)
        kl = posterior.kl().mean() / (LATENT_CHANNELS * LATENT_SIZE**2)
        loss = rec_loss + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(rec=f"{rec_avg.update(rec_loss.item()):.4f}", kl=f"{kl_avg.update(kl.item()):.2f}")
    train_time = time.time() - start

    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(x.expand(-1, 3, -1, -1)).latent_dist.sample(gen) for x in data.images.split(256)])
        std = z.std().item()
        vae.register_to_config(scaling_factor=1.0 / std)
        xt = test.images.expand(-1, 3, -1, -1)
        rec = torch.cat([vae.decode(vae.encode(x).latent_dist.mode()).sample for x in xt.split(256)])
        test_mse = F.mse_loss(rec.clamp(-1, 1), xt).item()
    out = Path(args.vae_dir)
    vae.save_pretrained(out)
    psnr = 10 * math.log10(4.0 / test_mse)
    print(
        f"[vae] final rec MSE {rec_avg.value:.5f}  KL/elem {kl_avg.value:.3f}  test MSE {test_mse:.5f} "
        f"(PSNR {psnr:.1f} dB)  latent mean {z.mean():.3f} std {std:.3f} -> scaling_factor {1 / std:.4f}  "
        f"per-channel mean {[round(v, 2) for v in z.mean(dim=(0, 2, 3)).tolist()]}  "
        f"wall {train_time:.0f}s  saved {out} ({dir_size_mb(out):.2f} MB)"
    )


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (latents are sampled from them during training)."""
    means, stds = [], []
    for x in images.split(256):
        dist = vae.encode(x.expand(-1, 3, -1, -1)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


# ----------------------------------------------------------------------------------------- classifier


def train_classifier(args: argparse.Namespace) -> None:
    """Train the digits CNN with augmentation + pixel noise so it also copes with generated images."""
    gen = seed_everything(args.seed)
    data = digits.load_digits_data("train")
    test = digits.load_digits_data("test")
    model = digits.DigitsClassifier().train()
    print(f"classifier params: {param_count(model)}")
    steps, bs = args.steps or 400, args.batch_size or 64
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr or 2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup=50, floor=0.02))
    avg = RunningLoss()
    start = time.time()
    for _ in (bar := tqdm(range(steps), desc="classifier")):
        idx = torch.randint(len(data.labels), (bs,), generator=gen)
        x = digits.augment(data.images[idx], gen, max_rotation_deg=12.0, max_shift=0.1, scale_range=(0.85, 1.1))
        x = x + torch.randn(x.shape, generator=gen) * torch.rand(bs, 1, 1, 1, generator=gen) * 0.15
        loss = F.cross_entropy(model(x.clamp(-1, 1)), data.labels[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{avg.update(loss.item()):.4f}")
    train_time = time.time() - start
    model.eval()
    train_acc = (model.predict(data.images) == data.labels).float().mean().item()
    test_acc = (model.predict(test.images) == test.labels).float().mean().item()
    model.config.metrics = {"train_accuracy": round(train_acc, 4), "test_accuracy": round(test_acc, 4)}
    model.save_pretrained(args.classifier_dir)
    print(
        f"[classifier] final loss {avg.value:.4f}  train acc {train_acc:.4f}  test acc {test_acc:.4f}  "
        f"wall {train_time:.0f}s  saved {args.classifier_dir} ({dir_size_mb(Path(args.classifier_dir)):.2f} MB)"
    )


# ------------------------------------------------------------------------------------ diffusion models


def train_diffusion(
    name: str,
    modules: list[torch.nn.Module],
    predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    latents: tuple[torch.Tensor, torch.Tensor],
    scaling_factor: float,
    args: argparse.Namespace,
    gen: torch.Generator,
    default_steps: int,
    prediction_type: str = "epsilon",
    on_step: Callable[[int, list[torch.nn.Module]], None] | None = None,
) -> tuple[list[torch.nn.Module], float, float]:
    """Diffusion training with EMA. ``prediction_type="epsilon"`` or ``"v_prediction"``: DDPM noise levels with
    min-SNR(5) weighting, predicting the noise or the velocity (the same weights then put more weight on high noise
    levels). ``"flow_prediction"``: rectified flow as SD3, Sana and Wan train it (``flow_matching_batch``).

    ``predict(noisy_latents, timesteps, batch_index)`` runs the model on the given rows of the dataset;
    ``on_step(steps_done, ema_modules)``, if given, is called after every optimizer step (e.g. to save checkpoints).
    Returns the EMA copies of ``modules``, the final smoothed loss and the wall time.
    """
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(**BETA_KWARGS)
    alphas_cumprod = noise_sched.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    loss_weight = snr.clamp(max=5.0) / snr
    steps, bs = args.steps or default_steps, args.batch_size or 32
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr or 1e-3, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps))
    emas = [EMA(m) for m in modules]
    mean, std = latents
    avg = RunningLoss()
    start = time.time()
    for step in (bar := tqdm(range(steps), desc=name)):
        idx = torch.randint(len(mean), (bs,), generator=gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling_factor
        if prediction_type == "flow_prediction":
            noise = torch.randn(z0.shape, generator=gen)
            noisy, t, target = flow_matching_batch(z0, noise, gen)
            weight = 1.0  # plain velocity MSE
        else:  # draws in the order that made the shipped models
            t = torch.randint(TRAIN_TIMESTEPS, (bs,), generator=gen)
            noise = torch.randn(z0.shape, generator=gen)
            noisy = noise_sched.add_noise(z0, noise, t)
            target = noise if prediction_type == "epsilon" else noise_sched.get_velocity(z0, noise, t)
            weight = loss_weight[t]
        pred = predict(noisy, t, idx)
        loss = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        loss = (loss * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        for ema, module in zip(emas, modules, strict=True):
            ema.update(module, step)
        bar.set_postfix(loss=f"{avg.update(loss.item()):.4f}")
        if on_step is not None:
            on_step(step + 1, [e.module for e in emas])
    return [e.module for e in emas], avg.value or float("nan"), time.time() - start


def flow_matching_batch(
    z0: torch.Tensor, noise: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rectified flow: x = (1 - s) z0 + s noise at a logit-normal s (SD3's sampling of noise levels), the model
    fed the timestep 1000 s (as diffusers' flow schedulers feed it) and trained to predict the velocity noise - z0.
    Returns (noisy latents, timesteps, target)."""
    sigma = torch.sigmoid(torch.randn(len(z0), generator=gen))
    s = sigma.view(-1, *([1] * (z0.dim() - 1)))
    return (1 - s) * z0 + s * noise, sigma * TRAIN_TIMESTEPS, noise - z0


def load_vae_and_latents(args: argparse.Namespace):
    """The trained VAE (eval) and posterior mean/std of the training images."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(resolve_vae_dir(Path(args.vae_dir))).eval()
    data = digits.load_digits_data("train")
    return vae, data, encode_dataset(vae, data.images)


def disable_label_dropout(model: torch.nn.Module) -> None:
    """Put DiT's per-block LabelEmbedding modules in eval mode.

    Each DiT block owns a label embedding that would drop labels independently in train mode;
    we drop labels ourselves (consistently across blocks) to the null class instead.
    """
    from diffusers.models.embeddings import LabelEmbedding

    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            m.eval()


def train_dit(args: argparse.Namespace) -> None:
    """Class-conditional DiT (10 digits, null class 1000) -> DiTPipeline in assets/dit-digits."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

    gen = seed_everything(args.seed)
    vae, data, latents = load_vae_and_latents(args)
    model = DiTTransformer2DModel(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=args.dit_layers,
        sample_size=LATENT_SIZE,
        patch_size=2,
        num_embeds_ada_norm=DIT_NULL_CLASS,  # DiTPipeline uses class id 1000 as the unconditional class
    ).train()
    disable_label_dropout(model)
    print(f"DiT params: {param_count(model)}  tokens: {(LATENT_SIZE // 2) ** 2}")

    def predict(noisy: torch.Tensor, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        labels = data.labels[idx].clone()
        labels[torch.rand(len(idx), generator=gen) < args.cond_dropout] = DIT_NULL_CLASS
        return model(noisy, timestep=t, class_labels=labels).sample

    flow = args.dit_objective == "flow"
    (ema,), loss, wall = train_diffusion(
        "dit", [model], predict, latents, vae.config.scaling_factor, args, gen, default_steps=3000,
        prediction_type="flow_prediction" if flow else "epsilon",
    )
    if flow:  # DPM-Solver++ on flow sigmas, as diffusers runs Sana (DiTPipeline needs scale_model_input)
        scheduler = DPMSolverMultistepScheduler(
            num_train_timesteps=TRAIN_TIMESTEPS, use_flow_sigmas=True, flow_shift=1.0, prediction_type="flow_prediction"
        )
    else:
        scheduler = DDIMScheduler(**BETA_KWARGS, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    pipe = DiTPipeline(transformer=ema.half(), vae=vae, scheduler=scheduler)
    pipe.register_to_config(id2label={str(i): word for i, word in enumerate(digits.DIGIT_WORDS)})
    out = Path(args.dit_out)
    pipe.save_pretrained(out, safe_serialization=True)
    print(f"[dit] final loss {loss:.4f}  wall {wall:.0f}s  saved {out} ({dir_size_mb(out):.2f} MB)")


def build_text_encoder(vocab_size: int):  # -> T5EncoderModel
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def caption_table(data: digits.DigitsData, tokenizer, max_length: int):
    """Tokenized unique captions ("" first) and, per image, the indices of its valid captions."""
    attrs = digits.caption_attributes(data.images, data.labels)
    per_image = [digits.caption_options(int(y), m, s) for y, m, s in zip(data.labels.tolist(), attrs.mass, attrs.slant)]
    unique = ["", *sorted({c for opts in per_image for c in opts})]
    index = {c: i for i, c in enumerate(unique)}
    enc = tokenizer(unique, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return unique, enc.input_ids, enc.attention_mask, [[index[c] for c in opts] for opts in per_image]


def save_text_pipeline(pipe, path: Path) -> None:
    """``save_pretrained`` (safetensors), naming the tokenizer class that loads tokenizer.json on both
    transformers 4.x and 5.x."""
    pipe.save_pretrained(path, safe_serialization=True)
    index_path = Path(path) / "model_index.json"
    model_index = json.loads(index_path.read_text())
    model_index["tokenizer"] = ["transformers", "T5TokenizerFast"]
    index_path.write_text(json.dumps(model_index, indent=2, sort_keys=True) + "\n")


def train_pixart(args: argparse.Namespace) -> None:
    """Text-conditional PixArt-alpha + tiny T5 trained jointly -> PixArtAlphaPipeline in assets/pixart-digits."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    gen = seed_everything(args.seed)
    vae, data, latents = load_vae_and_latents(args)
    max_length = PIXART_CALL_KWARGS["max_sequence_length"]
    tokenizer = digits.build_caption_tokenizer(model_max_length=max_length)
    text_encoder = build_text_encoder(len(tokenizer)).train()
    model = PixArtTransformer2DModel(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,  # no learned-sigma channels
        num_layers=NUM_LAYERS,
        cross_attention_dim=HEADS * HEAD_DIM,
        sample_size=LATENT_SIZE,
        patch_size=2,
        caption_channels=text_encoder.config.d_model,
        use_additional_conditions=False,
    ).train()
    captions, ids, mask, options = caption_table(data, tokenizer, max_length)
    print(
        f"PixArt params: {param_count(model)}  T5 params: {param_count(text_encoder)}  "
        f"vocab {len(tokenizer)}  captions {len(captions) - 1}  e.g. {captions[1:4]}"
    )

    def predict(noisy: torch.Tensor, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        choice = [opts[int(torch.randint(len(opts), (1,), generator=gen))] for opts in (options[i] for i in idx)]
        cap = torch.tensor(choice)
        cap[torch.rand(len(idx), generator=gen) < args.cond_dropout] = 0  # "" = the pipeline's negative prompt
        emb = text_encoder(ids[cap], attention_mask=mask[cap]).last_hidden_state
        return model(
            noisy,
            encoder_hidden_states=emb,
            encoder_attention_mask=mask[cap],
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample

    (ema, ema_text), loss, wall = train_diffusion(
        "pixart", [model, text_encoder], predict, latents, vae.config.scaling_factor, args, gen, default_steps=3000
    )
    scheduler = DPMSolverMultistepScheduler(**BETA_KWARGS)
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=ema_text, vae=vae, transformer=ema.half(), scheduler=scheduler
    )
    save_text_pipeline(pipe, PIXART_DIGITS_DIR)
    print(f"[pixart] final loss {loss:.4f}  wall {wall:.0f}s")
    # Make the stock call (resolution binning) work: 256 px bin <-> the 16x16 latents, transformer weights kept.
    from pixart_binning_vae import build_parser, convert  # scripts/pixart_binning_vae.py

    binning_args = build_parser().parse_args(["--old-vae-dir", str(resolve_vae_dir(Path(args.vae_dir)))])
    convert(PIXART_DIGITS_DIR, binning_args)
    print(f"[pixart] saved {PIXART_DIGITS_DIR} ({dir_size_mb(PIXART_DIGITS_DIR):.2f} MB)")


# ----------------------------------------------------------------------------------------------- verify


def save_labeled_grid(images: list, ncols: int, row_labels: list[str], col_labels: list[str], path: Path) -> None:
    """Save a grid of PIL images with row/column labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pad, scale = 2, 1
    grid = digits.sample_grid(images, ncols, scale=scale, pad=pad)
    cell = images[0].size[0] + pad
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * ncols, 0.5 + 0.75 * len(row_labels)), dpi=100)
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([pad / 2 + cell * (i + 0.5) for i in range(len(col_labels))], col_labels, fontsize=7, rotation=30)
    ax.set_yticks([pad / 2 + cell * (i + 0.5) for i in range(len(row_labels))], row_labels, fontsize=8)
    ax.tick_params(length=0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def accuracy(classifier: digits.DigitsClassifier, images: list, labels: Iterable[int]) -> float:
    preds = classifier.predict(digits.to_classifier_input(images))
    return (preds == torch.tensor(list(labels))).float().mean().item()


def verify(args: argparse.Namespace) -> None:
    """Load both pipelines with plain from_pretrained, sample 20 steps with CFG, classify, save grids."""
    from diffusers import DiTPipeline, PixArtAlphaPipeline

    torch.manual_seed(args.seed)
    classifier = digits.DigitsClassifier.from_pretrained(args.classifier_dir)
    test = digits.load_digits_data("test")
    train = digits.load_digits_data("train")
    test_feats = classifier.features(test.images).detach()
    results: dict[str, object] = {
        "classifier_test_accuracy": (classifier.predict(test.images) == test.labels).float().mean().item(),
        "fd_train_vs_test": digits.frechet_distance(classifier.features(train.images).detach(), test_feats),
    }
    # The same with as many train images as generated ones (FD is biased upward for small sets).
    subset = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(args.seed))
    subset = subset[: 10 * args.samples_per_class]
    results[f"fd_train{len(subset)}_vs_test"] = digits.frechet_distance(
        classifier.features(train.images[subset]).detach(), test_feats
    )
    per_class = args.samples_per_class

    if "dit" in args.models:
        # --- DiT
        pipe = DiTPipeline.from_pretrained(DIT_DIGITS_DIR)
        pipe.set_progress_bar_config(disable=True)
        print(f"DiT pipeline: transformer dtype {pipe.transformer.dtype}, labels {pipe.labels}")
        labels = [c for c in range(digits.NUM_CLASSES) for _ in range(per_class)]
        for scale in (1.0, 1.5, 4.0):
            start = time.time()
            images = pipe(
                class_labels=labels,
                num_inference_steps=20,
                guidance_scale=scale,
                generator=torch.Generator().manual_seed(args.seed),
            ).images
            acc = accuracy(classifier, images, labels)
            fd = digits.frechet_distance(classifier.features(digits.to_classifier_input(images)).detach(), test_feats)
            results[f"dit_cfg{scale}"] = {"accuracy": acc, "fd_vs_test": fd, "seconds": time.time() - start}
            print(f"[verify] DiT cfg {scale}: accuracy {acc:.3f}  FD {fd:.2f}  ({time.time() - start:.1f}s)")
            if scale == args.dit_guidance:
                shown = [images[c * per_class + j] for c in range(10) for j in range(min(10, per_class))]
                save_labeled_grid(
                    shown,
                    min(10, per_class),
                    [str(c) for c in range(10)],
                    [f"#{j}" for j in range(min(10, per_class))],
                    DOCS_DIR / "samples_dit.png",
                )

    if "pixart" in args.models:
        # --- PixArt
        pipe = PixArtAlphaPipeline.from_pretrained(PIXART_DIGITS_DIR)
        pipe.set_progress_bar_config(disable=True)
        print(f"PixArt pipeline: tokenizer {type(pipe.tokenizer).__name__}, transformer dtype {pipe.transformer.dtype}")
        adjectives = [(), ("thick",), ("thin",), ("slanted",), ("upright",)]
        prompts = [digits.caption_for(c, adj) for c in range(digits.NUM_CLASSES) for adj in adjectives]
        n = args.pixart_per_prompt
        start = time.time()
        images = pipe(
            prompt=prompts,
            num_images_per_prompt=n,
            num_inference_steps=20,
            guidance_scale=args.pixart_guidance,
            generator=torch.Generator().manual_seed(args.seed),
            **PIXART_CALL_KWARGS,
        ).images
        prompt_digits = [c for c in range(digits.NUM_CLASSES) for _ in adjectives for _ in range(n)]
        acc = accuracy(classifier, images, prompt_digits)
        x = digits.to_classifier_input(images)
        unit = digits.to_unit(x).reshape(digits.NUM_CLASSES, len(adjectives), n, *x.shape[-2:])
        mass = digits.stroke_mass(unit.flatten(0, 2)).reshape(digits.NUM_CLASSES, len(adjectives), n).mean(-1)
        tilt = digits.slant(unit.flatten(0, 2)).reshape(digits.NUM_CLASSES, len(adjectives), n).mean(-1)
        fd = digits.frechet_distance(classifier.features(x).detach(), test_feats)
        results["pixart"] = {
            "guidance_scale": args.pixart_guidance,
            "accuracy": acc,
            "fd_vs_test": fd,
            "seconds": time.time() - start,
            "digits_where_thick_mass_gt_thin": int((mass[:, 1] > mass[:, 2]).sum()),
            "digits_where_slanted_slant_gt_upright": int((tilt[:, 3] > tilt[:, 4]).sum()),
            "mean_mass_thick_thin": [mass[:, 1].mean().item(), mass[:, 2].mean().item()],
            "mean_slant_slanted_upright": [tilt[:, 3].mean().item(), tilt[:, 4].mean().item()],
        }
        print(f"[verify] PixArt cfg {args.pixart_guidance}: {json.dumps(results['pixart'])}")
        shown = [
            images[(c * len(adjectives) + a) * n + j]
            for c in range(10)
            for a in range(len(adjectives))
            for j in range(2)
        ]
        col_labels = [" ".join(adj) or "plain" for adj in adjectives for _ in range(2)]
        save_labeled_grid(
            shown, 2 * len(adjectives), [str(c) for c in range(10)], col_labels, DOCS_DIR / "samples_pixart.png"
        )

    sizes = {p.name: round(dir_size_mb(p), 2) for p in (DIT_DIGITS_DIR, PIXART_DIGITS_DIR, Path(args.classifier_dir))}
    results["sizes_mb"] = sizes
    out = Path(args.work_dir) / f"verify_{'_'.join(args.models)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"[verify] {json.dumps(results)}\nwrote {out} and the sample grids in {DOCS_DIR}")


# ------------------------------------------------------------------------------------------------- main


STAGES: dict[str, Callable[[argparse.Namespace], None]] = {
    "vae": train_vae,
    "classifier": train_classifier,
    "dit": train_dit,
    "pixart": train_pixart,
    "verify": verify,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=[*STAGES, "all"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (stage default if omitted)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--cond-dropout", type=float, default=0.1, help="label/caption dropout for CFG")
    parser.add_argument("--work-dir", default=str(DEFAULT_WORK_DIR))
    parser.add_argument("--vae-dir", default=str(DEFAULT_WORK_DIR / "vae"))
    parser.add_argument("--classifier-dir", default=str(CLASSIFIER_DIR))
    parser.add_argument("--samples-per-class", type=int, default=36, help="verify: DiT samples per digit")
    parser.add_argument("--models", nargs="+", default=["dit", "pixart"], help="verify: which pipelines")
    parser.add_argument("--pixart-per-prompt", type=int, default=8, help="verify: PixArt images per prompt")
    parser.add_argument("--dit-guidance", type=float, default=4.0, help="verify: CFG scale for the DiT grid")
    parser.add_argument("--pixart-guidance", type=float, default=4.0, help="verify: PixArt CFG scale")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--dit-layers", type=int, default=NUM_LAYERS,
                        help="dit: transformer blocks (another depth: a model the cache rules were not tuned on)")
    parser.add_argument("--dit-objective", choices=["epsilon", "flow"], default="epsilon",
                        help="dit: predict the noise (DDIM, the shipped model) or the flow velocity "
                        "(rectified flow, saved with DPM-Solver++ on flow sigmas)")
    parser.add_argument("--dit-out", default=str(DIT_DIGITS_DIR),
                        help="dit: where to save the pipeline (default: the shipped asset)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in STAGES if args.stage == "all" else [args.stage]:
        start = time.time()
        STAGES[name](args)
        print(f"== stage {name} done in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
