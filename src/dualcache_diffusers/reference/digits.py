"""Reference data and models built on scikit-learn's handwritten digits.

Everything the shipped reference pipelines (``assets/dit-digits``, ``assets/pixart-digits``) and the
digits classifier (``assets/digits-classifier``) need lives here:

* data: the 1797 8x8 digits (values 0..16) scaled to [-1, 1] and upsampled (bicubic) to 32x32,
  split into a fixed stratified train/test split;
* captions for the text-conditional model, derived from measured stroke mass and slant
  ("a thick seven", "a thin two", "a slanted one", "an upright eight", "a seven");
* the caption tokenizer (a word-level T5 tokenizer built locally with ``tokenizers``);
* a small CNN classifier whose penultimate features serve Frechet distances;
* helpers that turn pipeline outputs into classifier inputs and tile images into grids.

Images use white ink on a black background. Pipelines emit RGB; the classifier reads grayscale.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
DIT_DIGITS_DIR = ASSETS_DIR / "dit-digits"
PIXART_DIGITS_DIR = ASSETS_DIR / "pixart-digits"
CLASSIFIER_DIR = ASSETS_DIR / "digits-classifier"

IMAGE_SIZE = 32
NUM_CLASSES = 10
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MASS_WORDS = ("thin", "thick")
SLANT_WORDS = ("upright", "slanted")
# DiTPipeline hard-codes the null (unconditional) class id as 1000, whatever the number of classes.
DIT_NULL_CLASS = 1000
# Keyword arguments the project calls the shipped digits PixArt with: the plain call works too (stock resolution
# binning generates at the 256 px bin = the trained 16x16 latents, then resizes to the requested size, by default
# 512 px); these ask for the model's 32 px images, skip caption cleaning (needs bs4/ftfy; the captions are plain
# words) and keep the 16-token prompts it was trained with (the default 120 gives the same images, more slowly).
PIXART_CALL_KWARGS = {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "clean_caption": False, "max_sequence_length": 16}


# --------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DigitsData:
    """A split of the digits dataset: ``images`` [N, 1, S, S] in [-1, 1], ``labels`` [N] int64."""

    images: torch.Tensor
    labels: torch.Tensor


def upsample_digits(raw: np.ndarray, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """Scale raw 8x8 digits (0..16) to [-1, 1] and upsample them bicubically to ``image_size``."""
    x = torch.as_tensor(np.asarray(raw, dtype=np.float32)).reshape(-1, 1, 8, 8) / 8.0 - 1.0
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False)
    return x.clamp(-1.0, 1.0)


def load_digits_data(
    split: str = "train", image_size: int = IMAGE_SIZE, test_fraction: float = 0.2, seed: int = 0
) -> DigitsData:
    """Load ``split`` ("train", "test" or "all") of the digits as images in [-1, 1].

    The train/test split is stratified and fixed by ``seed``; all generative models train on
    "train" only, so "test" stays a held-out reference set for classifier accuracy and Frechet distance.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    raw, labels = digits.images, digits.target
    if split != "all":
        idx_train, idx_test = train_test_split(
            np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels
        )
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; use 'train', 'test' or 'all'")
        idx = np.sort(idx_train if split == "train" else idx_test)
        raw, labels = raw[idx], labels[idx]
    return DigitsData(upsample_digits(raw, image_size), torch.as_tensor(labels, dtype=torch.long))


def augment(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    max_rotation_deg: float = 10.0,
    max_shift: float = 0.08,
    scale_range: tuple[float, float] = (0.9, 1.1),
) -> torch.Tensor:
    """Random small rotation/scale/shift of a batch in [-1, 1] (background stays -1)."""
    n = images.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (hi - lo) + lo

    angle = uniform(-max_rotation_deg, max_rotation_deg) * math.pi / 180.0
    scale = uniform(*scale_range)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos, -sin, uniform(-max_shift, max_shift) * 2], dim=1),
            torch.stack([sin, cos, uniform(-max_shift, max_shift) * 2], dim=1),
        ],
        dim=1,
    ).to(images)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images + 1.0, grid, align_corners=False) - 1.0


# ------------------------------------------------------------------------------------------- captions


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] in [-1, 1] -> grayscale [N, H, W] in [0, 1]."""
    return ((images.mean(dim=1) + 1.0) / 2.0).clamp(0.0, 1.0)


def stroke_mass(images01: torch.Tensor) -> torch.Tensor:
    """Mean ink intensity of grayscale images [N, H, W] in [0, 1] (higher = thicker strokes)."""
    return images01.flatten(1).mean(dim=1)


def slant(images01: torch.Tensor) -> torch.Tensor:
    """Shear of the ink distribution: horizontal drift per row going up (positive = leaning right).

    Computed from second moments, -cov(x, y) / var(y) with y pointing down; size invariant.
    """
    h, w = images01.shape[-2:]
    weights = images01.flatten(1)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-8)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=weights.dtype), torch.arange(w, dtype=weights.dtype), indexing="ij")
    xs, ys = xs.flatten(), ys.flatten()
    mx, my = weights @ xs, weights @ ys
    dx, dy = xs[None] - mx[:, None], ys[None] - my[:, None]
    cov_xy = (weights * dx * dy).sum(dim=1)
    var_y = (weights * dy * dy).sum(dim=1).clamp_min(1e-8)
    return -cov_xy / var_y


def caption_for(digit: int, adjectives: Sequence[str] = ()) -> str:
    """Build "a thick seven", "an eight", "an upright six" ... with the right article."""
    words = [*adjectives, DIGIT_WORDS[digit]]
    article = "an" if words[0] in ("eight", "upright") else "a"
    return " ".join([article, *words])


def caption_vocabulary() -> list[str]:
    """All words that can appear in a caption."""
    return ["a", "an", *MASS_WORDS, *SLANT_WORDS, *DIGIT_WORDS]


@dataclass(frozen=True)
class CaptionAttributes:
    """Per-image adjectives ("" when the image is unremarkable) derived from within-class quantiles."""

    mass: list[str]
    slant: list[str]


def caption_attributes(
    images: torch.Tensor, labels: torch.Tensor, low: float = 1 / 3, high: float = 2 / 3
) -> CaptionAttributes:
    """Label each image thin/thick (stroke mass) and upright/slanted (slant) relative to its own class.

    Images in the lowest ``low`` quantile of their class get the first word of the pair, those above
    the ``high`` quantile the second; the middle band gets no adjective.
    """
    unit = to_unit(images)
    measures = {"mass": (stroke_mass(unit), MASS_WORDS), "slant": (slant(unit), SLANT_WORDS)}
    out: dict[str, list[str]] = {}
    for name, (values, (low_word, high_word)) in measures.items():
        words = [""] * len(labels)
        for digit in range(NUM_CLASSES):
            idx = (labels == digit).nonzero().flatten()
            if len(idx) == 0:
                continue
            lo, hi = torch.quantile(values[idx], torch.tensor([low, high]))
            for i in idx.tolist():
                words[i] = low_word if values[i] <= lo else high_word if values[i] >= hi else ""
        out[name] = words
    return CaptionAttributes(mass=out["mass"], slant=out["slant"])


def caption_options(digit: int, mass_word: str = "", slant_word: str = "") -> list[str]:
    """Every caption that truthfully describes an image: plain, with one adjective, or both."""
    options = [caption_for(digit)]
    if mass_word:
        options.append(caption_for(digit, [mass_word]))
    if slant_word:
        options.append(caption_for(digit, [slant_word]))
    if mass_word and slant_word:
        options.append(caption_for(digit, [mass_word, slant_word]))
    return options


def build_caption_tokenizer(model_max_length: int = 16):  # -> transformers.T5TokenizerFast
    """A T5 tokenizer whose vocabulary is exactly the caption words (one token per word).

    Layout follows T5: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, then "▁word" pieces; no sentinel ids.
    The backend is a ``tokenizers`` Unigram model with Metaspace pre-tokenization, so the saved
    ``tokenizer.json`` loads with ``T5TokenizerFast.from_pretrained``. Unknown words map to ``<unk>``.
    """
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in caption_vocabulary()]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


# ----------------------------------------------------------------------------------------- classifier


@dataclass
class ClassifierConfig:
    """Architecture (and recorded metrics) of :class:`DigitsClassifier`."""

    channels: tuple[int, ...] = (16, 32, 64)
    feature_dim: int = 64
    # Average-pool the input by this factor first (the digits are 8x8 upsampled, so 16x16 loses nothing).
    downsample: int = 2
    num_classes: int = NUM_CLASSES
    image_size: int = IMAGE_SIZE
    metrics: dict[str, float] = field(default_factory=dict)


class DigitsClassifier(nn.Module):
    """Small CNN on grayscale [N, 1, 32, 32] images in [-1, 1] (pooled to 16x16 inside).

    ``forward`` returns logits; ``features`` returns the penultimate ``feature_dim`` activations
    (post-ReLU), the embedding to use for Frechet distances between image sets.
    """

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config or ClassifierConfig()
        layers: list[nn.Module] = []
        in_ch = 1
        for i, ch in enumerate(self.config.channels):
            layers += [nn.Conv2d(in_ch, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU()]
            layers.append(nn.MaxPool2d(2) if i < len(self.config.channels) - 1 else nn.AdaptiveAvgPool2d(1))
            in_ch = ch
        pool = [nn.AvgPool2d(self.config.downsample)] if self.config.downsample > 1 else []
        self.body = nn.Sequential(*pool, *layers, nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(in_ch, self.config.feature_dim), nn.ReLU())
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(self.config.feature_dim, self.config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate feature vectors [N, feature_dim]."""
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [N, num_classes]."""
        return self.head(self.dropout(self.features(x)))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Predicted class ids [N] (eval mode, batched)."""
        was_training = self.training
        self.eval()
        preds = torch.cat([self(chunk).argmax(dim=1) for chunk in x.split(batch_size)])
        self.train(was_training)
        return preds

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``model.safetensors`` and ``config.json``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps(asdict(self.config), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path = CLASSIFIER_DIR) -> DigitsClassifier:
        """Load a saved classifier (defaults to the shipped one) in eval mode."""
        from safetensors.torch import load_file

        directory = Path(directory)
        raw = json.loads((directory / "config.json").read_text())
        raw["channels"] = tuple(raw["channels"])
        model = cls(ClassifierConfig(**raw))
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        return model.eval()


def to_classifier_input(
    images: Sequence[Image.Image] | np.ndarray | torch.Tensor, image_size: int = IMAGE_SIZE
) -> torch.Tensor:
    """Convert pipeline outputs to classifier input [N, 1, S, S] in [-1, 1].

    Accepts a list of PIL images (``output_type="pil"``), a numpy array [N, H, W, C] in [0, 1]
    (``output_type="np"``) or a tensor [N, C, H, W] in [0, 1] (``output_type="pt"``).
    Color images are averaged to grayscale; other sizes are resized bilinearly.
    """
    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu()
    elif isinstance(images, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(images)).float().permute(0, 3, 1, 2)
    else:
        arrays = [np.asarray(img.convert("L"), dtype=np.float32) / 255.0 for img in images]
        x = torch.from_numpy(np.stack(arrays))[:, None]
    x = x.mean(dim=1, keepdim=True)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return (x * 2.0 - 1.0).clamp(-1.0, 1.0)


def frechet_distance(features_a: torch.Tensor | np.ndarray, features_b: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] (e.g. classifier features).

    ``tr(sqrt(C_a C_b))`` is computed as ``sum(sqrt(eig(S C_b S)))`` with ``S = sqrt(C_a)``: the same
    value, but from symmetric eigen-decompositions only, so it is stable for singular covariances.
    """
    a, b = (np.asarray(f, dtype=np.float64) for f in (features_a, features_b))
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    values, vectors = np.linalg.eigh(cov_a)
    sqrt_a = (vectors * np.sqrt(values.clip(min=0.0))) @ vectors.T
    middle = sqrt_a @ cov_b @ sqrt_a
    trace_covmean = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2.0).clip(min=0.0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_covmean)


# ------------------------------------------------------------------------------------------- display


def sample_grid(images: Sequence[Image.Image], ncols: int, scale: int = 2, pad: int = 2) -> Image.Image:
    """Tile equally sized PIL images row-major into one RGB image, upscaled by ``scale`` (nearest)."""
    if not images:
        raise ValueError("no images to tile")
    w, h = images[0].size
    nrows = math.ceil(len(images) / ncols)
    grid = Image.new("RGB", (ncols * (w + pad) + pad, nrows * (h + pad) + pad), (64, 64, 64))
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        grid.paste(img.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST) if scale != 1 else grid
