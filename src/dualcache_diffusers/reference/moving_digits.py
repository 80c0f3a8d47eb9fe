"""Moving digits: short clips of one scikit-learn digit drifting across a small canvas.

The data of the shipped video reference pipeline (``assets/video-digits``, a ``LattePipeline``):

* a clip is ``NUM_FRAMES`` (8) frames of ``CANVAS`` x ``CANVAS`` (32x32) pixels, white ink on black,
  values in [-1, 1], the same format as the image digits (``reference/digits.py``), so the digits
  VAE encodes every frame as usual (4x16x16 latents, 64 tokens per frame with patch size 2);
* the digit is an 8x8 scikit-learn digit upsampled to ``DIGIT_SIZE`` (20x20) pixels, slightly
  rotated/rescaled, and drifts in a straight line ``left``, ``right``, ``up`` or ``down`` by
  ``TRAVEL`` pixels over the clip (about 1.4-1.7 px per frame) from one side of the canvas to the
  other, near its centre line (``ACROSS_JITTER``), always fully inside the canvas;
* the caption says the digit and the motion: "a seven moving left", "an eight moving up".

Everything is deterministic given a ``torch.Generator``. The module also holds what evaluation
needs: the centre-of-mass track of a clip, the direction it moves in, and square crops centred
on the digit, resized to 32x32, for the digits classifier (which was trained on full-frame digits).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import digits

VIDEO_DIGITS_DIR = digits.ASSETS_DIR / "video-digits"

NUM_FRAMES = 8
CANVAS = digits.IMAGE_SIZE  # 32: the digits VAE's training size
DIGIT_SIZE = 20
# Distance the digit moves between the first and the last frame, in pixels (sampled per clip).
TRAVEL = (10.0, 12.0)
# Largest offset of the path from the canvas centre line, across the motion, in pixels (sampled per clip).
ACROSS_JITTER = 2.0
DIRECTIONS = ("left", "right", "up", "down")
# Unit displacement of each direction in image coordinates (x to the right, y downwards).
DIRECTION_VECTORS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
MOTION_WORDS = ("moving", *DIRECTIONS)
# Recommended keyword arguments for ``LattePipeline.__call__`` on the shipped model: the transformer's
# temporal position embedding is built for 8 frames, so ``video_length`` must be 8; the model was trained on
# unmasked T5 outputs (``mask_feature=False``, any batch size) and on one-prompt calls with the default masking.
LATTE_CALL_KWARGS = {
    "video_length": NUM_FRAMES,
    "height": CANVAS,
    "width": CANVAS,
    "clean_caption": False,
    "mask_feature": False,
}


# ------------------------------------------------------------------------------------------- captions


def caption_for(digit: int, direction: str) -> str:
    """ "a seven moving left", "an eight moving up"."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; use one of {DIRECTIONS}")
    return f"{digits.caption_for(digit)} moving {direction}"


def parse_caption(caption: str) -> tuple[int | None, str | None]:
    """The digit and the direction a caption asks for (None where it names none or several)."""
    words = caption.lower().split()
    found_digits = {digits.DIGIT_WORDS.index(w) for w in words if w in digits.DIGIT_WORDS}
    found_dirs = {w for w in words if w in DIRECTIONS}
    return (
        found_digits.pop() if len(found_digits) == 1 else None,
        found_dirs.pop() if len(found_dirs) == 1 else None,
    )


def caption_vocabulary() -> list[str]:
    """Every word a video caption can contain: the image caption words plus the motion words."""
    return [*digits.caption_vocabulary(), *MOTION_WORDS]


def build_caption_tokenizer(model_max_length: int = 16):  # -> transformers.T5TokenizerFast
    """The word-level T5 tokenizer of :func:`digits.build_caption_tokenizer`, with the motion words added.

    The image words keep their ids (the motion words come after them), so a text encoder trained on
    the image captions can be extended by appending embedding rows.
    """
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in caption_vocabulary()]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


# ----------------------------------------------------------------------------------------------- clips


@dataclass(frozen=True)
class MovingDigitsClips:
    """A batch of clips: ``clips`` [N, F, 1, H, W] in [-1, 1], ``labels`` [N], ``directions`` [N] (indices
    into :data:`DIRECTIONS`), ``positions`` [N, F, 2] the (x, y) centre of the digit box in pixels."""

    clips: torch.Tensor
    labels: torch.Tensor
    directions: torch.Tensor
    positions: torch.Tensor

    @property
    def captions(self) -> list[str]:
        return [caption_for(int(y), DIRECTIONS[int(d)]) for y, d in zip(self.labels, self.directions)]


def render_clips(
    images: torch.Tensor,
    directions: torch.Tensor,
    generator: torch.Generator | None = None,
    num_frames: int = NUM_FRAMES,
    canvas: int = CANVAS,
    travel: tuple[float, float] = TRAVEL,
    across_jitter: float = ACROSS_JITTER,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Let each digit image [N, 1, s, s] (in [-1, 1]) drift in its direction across a ``canvas``-sized frame.

    Per clip the travel distance is uniform in ``travel``, the start along the motion axis is uniform
    over the positions that keep the whole path inside the canvas, and the position across the axis is
    within ``across_jitter`` pixels of the canvas centre (so the caption fixes the path up to a few pixels).
    Frames are sampled bilinearly (sub-pixel motion). Returns the clips
    [N, F, 1, canvas, canvas] and the digit-box centres [N, F, 2] in pixels.
    """
    n, _, size, _ = images.shape
    free = canvas - size
    if free < travel[1]:
        raise ValueError(f"a {size}px digit cannot travel {travel[1]}px on a {canvas}px canvas")
    dist = torch.rand(n, generator=generator) * (travel[1] - travel[0]) + travel[0]
    start_along = torch.rand(n, generator=generator) * (free - dist)
    jitter = min(across_jitter, free / 2.0)
    across = free / 2.0 + (torch.rand(n, generator=generator) * 2.0 - 1.0) * jitter
    vectors = torch.tensor([DIRECTION_VECTORS[d] for d in DIRECTIONS])[directions]  # [N, 2]
    half = size / 2.0
    # Box centre at the first frame: along the axis it starts at the side the digit moves away from.
    first = torch.empty(n, 2)
    horizontal = vectors[:, 0] != 0
    along_first = torch.where((vectors.sum(dim=1) > 0), start_along, free - start_along) + half
    first[:, 0] = torch.where(horizontal, along_first, across + half)
    first[:, 1] = torch.where(horizontal, across + half, along_first)
    steps = torch.linspace(0.0, 1.0, num_frames)
    positions = first[:, None, :] + steps[None, :, None] * dist[:, None, None] * vectors[:, None, :]  # [N, F, 2]

    # Affine map from canvas coordinates to the digit's normalized coordinates (align_corners=False).
    flat = positions.reshape(-1, 2)
    scale = canvas / size
    theta = torch.zeros(len(flat), 2, 3)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = -(flat - canvas / 2.0) * 2.0 / size
    grid = F.affine_grid(theta, [len(flat), 1, canvas, canvas], align_corners=False)
    src = (images + 1.0).repeat_interleave(num_frames, dim=0)
    frames = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0
    return frames.reshape(n, num_frames, 1, canvas, canvas), positions


def sample_clips(
    data: digits.DigitsData,
    num_clips: int,
    generator: torch.Generator | None = None,
    augment: bool = True,
    **render_kwargs,
) -> MovingDigitsClips:
    """``num_clips`` random clips: a random digit of ``data`` (images at ``DIGIT_SIZE``), a random direction,
    a small random rotation/rescale of the digit (``augment``), a random path."""
    idx = torch.randint(len(data.labels), (num_clips,), generator=generator)
    directions = torch.randint(len(DIRECTIONS), (num_clips,), generator=generator)
    images = data.images[idx]
    if augment:
        images = digits.augment(images, generator, max_rotation_deg=8.0, max_shift=0.0, scale_range=(0.92, 1.05))
    clips, positions = render_clips(images, directions, generator, **render_kwargs)
    return MovingDigitsClips(clips, data.labels[idx], directions, positions)


def load_digit_images(split: str = "train") -> digits.DigitsData:
    """The digits of ``split`` upsampled to ``DIGIT_SIZE`` (the sprites clips are made of)."""
    return digits.load_digits_data(split, image_size=DIGIT_SIZE)


def training_clips(split: str = "train", seed: int = 0, augment: bool = True) -> MovingDigitsClips:
    """The fixed training set: every digit of ``split`` once in each of the four directions (so each
    (digit, direction) pair is as frequent as the digit), with a random rotation/rescale and path."""
    data = load_digit_images(split)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.arange(len(data.labels)).repeat_interleave(len(DIRECTIONS))
    directions = torch.arange(len(DIRECTIONS)).repeat(len(data.labels))
    images = data.images[idx]
    if augment:
        images = digits.augment(images, gen, max_rotation_deg=8.0, max_shift=0.0, scale_range=(0.92, 1.05))
    clips, positions = render_clips(images, directions, gen)
    return MovingDigitsClips(clips, data.labels[idx], directions, positions)


def evaluation_clips(split: str = "test", per_pair: int = 1, seed: int = 0) -> MovingDigitsClips:
    """A fixed, balanced set of clips: ``per_pair`` clips for every (digit, direction) pair, no augmentation."""
    data = load_digit_images(split)
    gen = torch.Generator().manual_seed(seed)
    idx, dirs = [], []
    for digit in range(digits.NUM_CLASSES):
        pool = (data.labels == digit).nonzero().flatten()
        for d in range(len(DIRECTIONS)):
            pick = pool[torch.randint(len(pool), (per_pair,), generator=gen)]
            idx.append(pick)
            dirs += [d] * per_pair
    idx_t = torch.cat(idx)
    directions = torch.tensor(dirs)
    clips, positions = render_clips(data.images[idx_t], directions, gen)
    return MovingDigitsClips(clips, data.labels[idx_t], directions, positions)


# ----------------------------------------------------------------------------------------- evaluation


def as_clip_tensor(frames) -> torch.Tensor:
    """Pipeline output -> grayscale clips [N, F, H, W] in [0, 1].

    Accepts LattePipeline's ``output_type="pt"`` ([N, F, C, H, W] in [0, 1]), ``"np"`` ([N, F, H, W, C]),
    ``"pil"`` (a list of lists of PIL images), or dataset clips [N, F, 1, H, W] in [-1, 1]
    (pass ``frames=(clips + 1) / 2`` for those).
    """
    import numpy as np

    if isinstance(frames, torch.Tensor):
        x = frames.detach().float().cpu()
        if x.ndim != 5:
            raise ValueError(f"clips must be [N, F, C, H, W], got {tuple(x.shape)}")
        return x.mean(dim=2).clamp(0.0, 1.0)
    if isinstance(frames, np.ndarray):
        if frames.ndim != 5:
            raise ValueError(f"clips must be [N, F, H, W, C], got {frames.shape}")
        return torch.from_numpy(np.ascontiguousarray(frames)).float().mean(dim=-1).clamp(0.0, 1.0)
    clips = [np.stack([np.asarray(img.convert("L"), dtype=np.float32) / 255.0 for img in clip]) for clip in frames]
    return torch.from_numpy(np.stack(clips))


def centre_of_mass(clips01: torch.Tensor, floor: float = 0.2) -> torch.Tensor:
    """Ink centre of mass (x, y) in pixels of every frame of grayscale clips [N, F, H, W] -> [N, F, 2].

    Intensities below ``floor`` are ignored (background haze does not pull the centre to the middle).
    """
    h, w = clips01.shape[-2:]
    weights = (clips01 - floor).clamp_min(0.0)
    total = weights.sum(dim=(-2, -1)).clamp_min(1e-8)
    ys = torch.arange(h, dtype=weights.dtype) + 0.5
    xs = torch.arange(w, dtype=weights.dtype) + 0.5
    cx = (weights.sum(dim=-2) * xs).sum(dim=-1) / total
    cy = (weights.sum(dim=-1) * ys).sum(dim=-1) / total
    return torch.stack([cx, cy], dim=-1)


def displacement(clips01: torch.Tensor) -> torch.Tensor:
    """Displacement (dx, dy) in pixels from the first to the last frame, from a least-squares line through
    the centre-of-mass track of each clip [N, F, H, W] -> [N, 2]."""
    track = centre_of_mass(clips01)  # [N, F, 2]
    f = track.shape[1]
    t = torch.arange(f, dtype=track.dtype)
    t = t - t.mean()
    slope = (track * t[None, :, None]).sum(dim=1) / (t**2).sum()
    return slope * (f - 1)


def predicted_directions(clips01: torch.Tensor) -> torch.Tensor:
    """Index into :data:`DIRECTIONS` of the direction each clip moves in most (largest projected displacement)."""
    vectors = torch.tensor([DIRECTION_VECTORS[d] for d in DIRECTIONS], dtype=clips01.dtype)
    return (displacement(clips01) @ vectors.T).argmax(dim=1)


def digit_crops(clips01: torch.Tensor, window: float = DIGIT_SIZE + 2, out_size: int = digits.IMAGE_SIZE):
    """Square ``window``-pixel crops centred on each frame's centre of mass, resized to ``out_size``.

    Input grayscale clips [N, F, H, W] in [0, 1]; output classifier input [N * F, 1, out, out] in [-1, 1]
    (outside the canvas counts as background).
    """
    n, f, h, w = clips01.shape
    frames = clips01.reshape(n * f, 1, h, w)
    centre = centre_of_mass(clips01).reshape(n * f, 2)
    theta = torch.zeros(n * f, 2, 3, dtype=frames.dtype)
    theta[:, 0, 0] = window / w
    theta[:, 1, 1] = window / h
    theta[:, 0, 2] = (centre[:, 0] - w / 2.0) * 2.0 / w
    theta[:, 1, 2] = (centre[:, 1] - h / 2.0) * 2.0 / h
    grid = F.affine_grid(theta, [n * f, 1, out_size, out_size], align_corners=False)
    crops = F.grid_sample(frames, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (crops * 2.0 - 1.0).clamp(-1.0, 1.0)


@dataclass(frozen=True)
class ClipQuality:
    """Agreement of clips with their captions."""

    digit_accuracy: float  # fraction of frames the classifier reads as the requested digit
    clip_digit_accuracy: float  # fraction of clips whose majority vote over frames is the requested digit
    direction_accuracy: float  # fraction of clips whose centre of mass moves most in the requested direction
    mean_travel: float  # mean displacement along the requested direction, pixels (first -> last frame)
    mean_off_axis: float  # mean absolute displacement across the requested direction, pixels


@torch.no_grad()
def clip_quality(
    classifier: digits.DigitsClassifier,
    clips01: torch.Tensor,
    labels: Sequence[int],
    directions: Sequence[int],
) -> ClipQuality:
    """Classifier accuracy on digit crops and motion-direction accuracy of grayscale clips [N, F, H, W]."""
    labels_t = torch.as_tensor(list(labels), dtype=torch.long)
    dirs_t = torch.as_tensor(list(directions), dtype=torch.long)
    n, f = clips01.shape[:2]
    if len(labels_t) != n or len(dirs_t) != n:
        raise ValueError(f"{n} clips but {len(labels_t)} labels and {len(dirs_t)} directions")
    preds = classifier.predict(digit_crops(clips01)).reshape(n, f)
    votes = torch.mode(preds, dim=1).values
    vectors = torch.tensor([DIRECTION_VECTORS[d] for d in DIRECTIONS], dtype=clips01.dtype)[dirs_t]
    disp = displacement(clips01)
    along = (disp * vectors).sum(dim=1)
    across = (disp * vectors.flip(1)).sum(dim=1).abs()
    return ClipQuality(
        digit_accuracy=float((preds == labels_t[:, None]).float().mean()),
        clip_digit_accuracy=float((votes == labels_t).float().mean()),
        direction_accuracy=float((predicted_directions(clips01) == dirs_t).float().mean()),
        mean_travel=float(along.mean()),
        mean_off_axis=float(across.mean()),
    )


def expected_travel() -> float:
    """Mean first-to-last displacement of the training clips, pixels."""
    return sum(TRAVEL) / 2.0
