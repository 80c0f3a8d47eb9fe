"""Fidelity metrics: PSNR / SSIM between image batches, temporal consistency of clips, and digits-classifier metrics.

Images may be given as a list of PIL images, a numpy array ``[N, H, W, C]`` (uint8, or float in
[0, 1], what ``output_type="np"`` returns) or a tensor ``[N, C, H, W]`` in [0, 1]
(``output_type="pt"``). A single image (no batch axis) is accepted too.

SSIM is scikit-image's ``structural_similarity`` (Wang et al. 2004, 7x7 uniform window, or the
largest odd window that fits a smaller image), computed per image and per channel, then averaged
over channels. PSNR is ``10 log10(data_range^2 / MSE)`` per image; identical images give ``inf``.

Clips (video pipelines) are given as lists of PIL frame lists, numpy ``[N, F, H, W, C]`` or tensors
``[N, F, C, H, W]``. ``frame_psnr`` compares them frame by frame; ``temporal_psnr`` compares their
consecutive-frame differences, so it measures temporal consistency (flicker, jerky or missing motion)
against a reference clip, and ignores an error that stays the same in every frame.

The classifier metrics use the digits classifier shipped with the reference models
(``reference/digits.py``): Frechet distance in its penultimate feature space to the held-out test
split of scikit-learn's digits, and accuracy against the digit that was asked for.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

# Mean PSNR counts identical images (PSNR = inf) as this many dB, unless every image is identical.
PSNR_CAP_DB = 100.0

ImageBatch = Any  # list[PIL.Image] | np.ndarray | torch.Tensor


def as_float_images(images: ImageBatch) -> np.ndarray:
    """A batch of images as float64 ``[N, H, W, C]`` in [0, 1]."""
    if isinstance(images, torch.Tensor):
        array = images.detach().cpu().to(torch.float64).numpy()
        array = array[None] if array.ndim == 3 else array
        if array.ndim != 4:
            raise ValueError(f"images tensor must be [N, C, H, W] or [C, H, W], got shape {tuple(images.shape)}")
        return np.moveaxis(array, 1, -1).astype(np.float64)
    if isinstance(images, np.ndarray):
        array = images
    elif hasattr(images, "convert"):  # one PIL image
        array = np.asarray(images.convert("RGB"))[None]
    elif isinstance(images, Sequence) and images and all(hasattr(img, "convert") for img in images):
        array = np.stack([np.asarray(img.convert("RGB")) for img in images])
    else:
        raise TypeError(f"images must be PIL images, a numpy array or a torch tensor, got {type(images).__name__}")
    if array.dtype == np.uint8:
        array = array.astype(np.float64) / 255.0
    array = np.asarray(array, dtype=np.float64)
    if array.ndim == 2:  # one grayscale image [H, W]
        array = array[None, :, :, None]
    elif array.ndim == 3:  # one image [H, W, C], or a grayscale batch [N, H, W]
        array = array[None] if array.shape[-1] in (1, 3, 4) else array[..., None]
    if array.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {array.shape}")
    return array


def _pair(a: ImageBatch, b: ImageBatch) -> tuple[np.ndarray, np.ndarray]:
    x, y = as_float_images(a), as_float_images(b)
    if x.shape != y.shape:
        raise ValueError(f"image batches differ in shape: {x.shape} vs {y.shape}")
    return x, y


def mse(a: ImageBatch, b: ImageBatch) -> np.ndarray:
    """Mean squared error per image, shape [N]."""
    x, y = _pair(a, b)
    return ((x - y) ** 2).reshape(len(x), -1).mean(axis=1)


def psnr(a: ImageBatch, b: ImageBatch, data_range: float = 1.0) -> np.ndarray:
    """Peak signal-to-noise ratio in dB per image, shape [N]; ``inf`` where the images are identical, NaN where an
    image holds NaN (a broken generation must not score as a perfect one)."""
    return _psnr_of_errors(mse(a, b), data_range)


def ssim(a: ImageBatch, b: ImageBatch, data_range: float = 1.0) -> np.ndarray:
    """Structural similarity per image (mean over channels), shape [N]; 1.0 for identical images."""
    from skimage.metrics import structural_similarity

    x, y = _pair(a, b)
    side = min(x.shape[1], x.shape[2])
    if side < 3:
        raise ValueError(f"SSIM needs images of at least 3x3 pixels, got {x.shape[1]}x{x.shape[2]}")
    win_size = min(7, side if side % 2 else side - 1)
    scores = [
        structural_similarity(xi, yi, data_range=data_range, channel_axis=-1, win_size=win_size)
        for xi, yi in zip(x, y)
    ]
    return np.asarray(scores, dtype=np.float64)


def mean_psnr(values: Sequence[float] | np.ndarray, cap_db: float = PSNR_CAP_DB) -> float:
    """Mean of per-image PSNRs; identical images count as ``cap_db`` unless all are identical (then inf)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan")
    if np.isinf(values).all():
        return float("inf")
    return float(np.minimum(values, cap_db).mean())


# --------------------------------------------------------------------------------------- classifier metrics


def load_classifier(directory: str | Path | None = None):  # -> DigitsClassifier | None
    """The digits classifier in ``directory`` (default: the shipped one), or None with a warning if missing."""
    from .reference import digits

    directory = Path(directory) if directory is not None else digits.CLASSIFIER_DIR
    if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
        logger.warning("no digits classifier at %s: Frechet distance and accuracy are skipped", directory)
        return None
    return digits.DigitsClassifier.from_pretrained(directory)


def _classifier_input(images: ImageBatch) -> torch.Tensor:
    """Generated images as classifier input [N, 1, 32, 32] in [-1, 1]."""
    from .reference import digits

    if isinstance(images, (torch.Tensor, list)):
        return digits.to_classifier_input(images)
    return digits.to_classifier_input(as_float_images(images).astype(np.float32))


@torch.no_grad()
def _features(classifier: torch.nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    classifier.eval()
    return torch.cat([classifier.features(chunk) for chunk in x.split(batch_size)])


def classifier_features(classifier: torch.nn.Module, images: ImageBatch) -> torch.Tensor:
    """Penultimate classifier features [N, D] of generated images."""
    return _features(classifier, _classifier_input(images))


@torch.no_grad()
def classifier_accuracy(classifier: torch.nn.Module, images: ImageBatch, labels: Sequence[int]) -> float:
    """Fraction of images the classifier assigns to the requested digit."""
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    predictions = classifier.predict(_classifier_input(images))
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} images but {len(labels)} labels")
    return float((predictions == labels).float().mean())


_REAL_FEATURES: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


def real_digit_features(classifier: torch.nn.Module, split: str = "test") -> torch.Tensor:
    """Classifier features of the real digits of ``split`` (computed once per classifier)."""
    from .reference import digits

    per_split = _REAL_FEATURES.setdefault(classifier, {})
    if split not in per_split:
        per_split[split] = _features(classifier, digits.load_digits_data(split).images)
    return per_split[split]


def frechet_distance(features_a: torch.Tensor | np.ndarray, features_b: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D]."""
    from .reference import digits

    return digits.frechet_distance(features_a, features_b)


def frechet_distance_to_real(classifier: torch.nn.Module, images: ImageBatch, split: str = "test") -> float:
    """Frechet distance between generated images and the real digits of ``split`` in the classifier's features."""
    return frechet_distance(classifier_features(classifier, images), real_digit_features(classifier, split))


_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_of_text(text: str) -> int | None:
    """The digit a caption or class name asks for ("a thick seven" -> 7, "3" -> 3), or None."""
    words = re.findall(r"[a-z0-9]+", str(text).lower())
    found = {_DIGIT_WORDS.index(w) for w in words if w in _DIGIT_WORDS}
    found |= {int(w) for w in words if len(w) == 1 and w.isdigit()}
    return found.pop() if len(found) == 1 else None


# ------------------------------------------------------------------------------------------------- video

ClipBatch = Any  # list[list[PIL.Image]] | np.ndarray [N, F, H, W, C] | torch.Tensor [N, F, C, H, W]


def as_float_clips(clips: ClipBatch) -> np.ndarray:
    """A batch of clips as float64 ``[N, F, H, W, C]`` in [0, 1].

    Accepts what video pipelines return: a list of clips that are lists of PIL images (``output_type="pil"``),
    a numpy array ``[N, F, H, W, C]`` (``"np"``) or a tensor ``[N, F, C, H, W]`` in [0, 1] (``"pt"``).
    """
    if isinstance(clips, torch.Tensor):
        if clips.ndim != 5:
            raise ValueError(f"clips tensor must be [N, F, C, H, W], got shape {tuple(clips.shape)}")
        return np.stack([as_float_images(clip) for clip in clips])
    if isinstance(clips, np.ndarray):
        if clips.ndim != 5:
            raise ValueError(f"clips array must be [N, F, H, W, C], got shape {clips.shape}")
        return np.stack([as_float_images(clip) for clip in clips])
    if isinstance(clips, Sequence) and clips and all(isinstance(c, Sequence) and c for c in clips):
        return np.stack([as_float_images(list(clip)) for clip in clips])
    raise TypeError(f"clips must be lists of PIL frames, a numpy array or a torch tensor, got {type(clips).__name__}")


def _clip_pair(a: ClipBatch, b: ClipBatch) -> tuple[np.ndarray, np.ndarray]:
    x, y = as_float_clips(a), as_float_clips(b)
    if x.shape != y.shape:
        raise ValueError(f"clip batches differ in shape: {x.shape} vs {y.shape}")
    return x, y


def _psnr_of_errors(errors: np.ndarray, data_range: float) -> np.ndarray:
    """PSNR of mean squared errors: ``inf`` for 0, NaN for NaN (not ``inf``: NaN fails ``errors > 0``)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = np.where(errors > 0, 10.0 * np.log10(data_range**2 / np.maximum(errors, 1e-300)), np.inf)
    return np.where(np.isnan(errors), np.nan, scores)


def frame_psnr(a: ClipBatch, b: ClipBatch, data_range: float = 1.0) -> np.ndarray:
    """PSNR in dB of every frame of ``a`` against the same frame of ``b``, shape [N, F]."""
    x, y = _clip_pair(a, b)
    return _psnr_of_errors(((x - y) ** 2).mean(axis=(2, 3, 4)), data_range)


def temporal_psnr(a: ClipBatch, b: ClipBatch, data_range: float = 1.0) -> np.ndarray:
    """PSNR in dB between the consecutive-frame differences of ``a`` and those of ``b``, shape [N, F - 1].

    Entry ``t`` compares ``a[t + 1] - a[t]`` with ``b[t + 1] - b[t]``: it measures whether a clip changes
    from frame to frame the way the reference does (flicker, jerky or missing motion). An error that is the
    same in every frame (a static artifact) does not lower it; frame-to-frame variation of the error does.
    ``data_range`` is the pixel range (1.0), as for :func:`frame_psnr`, so the two are on the same scale.
    """
    x, y = _clip_pair(a, b)
    if x.shape[1] < 2:
        raise ValueError("temporal PSNR needs clips of at least 2 frames")
    dx, dy = np.diff(x, axis=1), np.diff(y, axis=1)
    return _psnr_of_errors(((dx - dy) ** 2).mean(axis=(2, 3, 4)), data_range)


def temporal_consistency(a: ClipBatch, b: ClipBatch, data_range: float = 1.0) -> dict[str, float]:
    """Fidelity of clips ``a`` (e.g. cached) to reference clips ``b`` (uncached), averaged over clips and frames:
    ``frame_psnr`` (per-frame PSNR), ``temporal_psnr`` (PSNR of consecutive-frame differences) and
    ``temporal_psnr_min`` (the worst frame transition of any clip, capped like :func:`mean_psnr`)."""
    per_frame = frame_psnr(a, b, data_range)
    per_step = temporal_psnr(a, b, data_range)
    return {
        "frame_psnr": mean_psnr(per_frame.ravel()),
        "temporal_psnr": mean_psnr(per_step.ravel()),
        "temporal_psnr_min": float(np.minimum(per_step, PSNR_CAP_DB).min()),
    }


# ------------------------------------------------------------------------------------- images or clips


def fidelity(a: np.ndarray, b: np.ndarray) -> dict[str, float | None]:
    """Fidelity of generated images or clips ``a`` to reference outputs ``b`` of the same seeds.

    Images ``[N, H, W, C]``: mean ``psnr`` (:func:`mean_psnr`) and ``ssim`` per image, ``temporal_psnr`` None.
    Clips ``[N, F, H, W, C]``: ``psnr`` and ``ssim`` over all frames (each frame against the same frame of
    the reference) and ``temporal_psnr``, the mean PSNR of consecutive-frame differences (:func:`temporal_psnr`).
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 5:
        return {"psnr": mean_psnr(psnr(a, b)), "ssim": float(ssim(a, b).mean()), "temporal_psnr": None}
    x, y = _clip_pair(a, b)
    frames_x, frames_y = x.reshape(-1, *x.shape[2:]), y.reshape(-1, *y.shape[2:])
    return {
        "psnr": mean_psnr(frame_psnr(x, y).ravel()),
        "ssim": float(ssim(frames_x, frames_y).mean()),
        "temporal_psnr": mean_psnr(temporal_psnr(x, y).ravel()),
    }
