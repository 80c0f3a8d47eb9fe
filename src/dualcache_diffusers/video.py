"""Video helpers: tile several clips side by side and write them as an animated GIF (PIL only).

Clips may be given the way video pipelines return them:

* a list of clips, each a list of PIL images (``output_type="pil"``);
* a numpy array ``[N, F, H, W, C]`` (uint8, or float in [0, 1]; ``output_type="np"``);
* a tensor ``[N, F, C, H, W]`` in [0, 1] (``output_type="pt"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

Clips = Any  # list[list[PIL.Image]] | np.ndarray | torch.Tensor


def clips_to_uint8(clips: Clips) -> np.ndarray:
    """Clips as uint8 RGB ``[N, F, H, W, 3]``."""
    if hasattr(clips, "detach"):  # torch tensor [N, F, C, H, W]
        array = clips.detach().float().cpu().numpy()
        if array.ndim != 5:
            raise ValueError(f"clips tensor must be [N, F, C, H, W], got shape {tuple(array.shape)}")
        array = np.moveaxis(array, 2, -1)
    elif isinstance(clips, np.ndarray):
        array = clips
    elif isinstance(clips, Sequence) and clips and all(isinstance(c, Sequence) and c for c in clips):
        lengths = {len(c) for c in clips}
        if len(lengths) != 1:
            raise ValueError(f"clips differ in length: {sorted(lengths)}")
        array = np.stack([np.stack([np.asarray(img.convert("RGB")) for img in clip]) for clip in clips])
    else:
        raise TypeError(
            f"clips must be a list of PIL frame lists, a numpy array or a tensor, got {type(clips).__name__}"
        )
    if array.ndim != 5:
        raise ValueError(f"clips must be [N, F, H, W, C], got shape {array.shape}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.shape[-1] != 3:
        raise ValueError(f"clips must have 1 or 3 channels, got {array.shape[-1]}")
    if array.dtype != np.uint8:
        array = (np.clip(np.asarray(array, dtype=np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return array


def clip_grid(
    clips: Clips, ncols: int | None = None, scale: int = 2, pad: int = 2, background: int = 64
) -> list[Image.Image]:
    """One frame per time step: the clips' frames at that step tiled row-major (``ncols`` per row, default
    all in one row), ``pad`` pixels of gray between them, upscaled ``scale`` times (nearest)."""
    array = clips_to_uint8(clips)
    n, f, h, w, _ = array.shape
    ncols = n if ncols is None else max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    frames = []
    for t in range(f):
        canvas = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), background, dtype=np.uint8)
        for i in range(n):
            r, c = divmod(i, ncols)
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            canvas[y : y + h, x : x + w] = array[i, t]
        image = Image.fromarray(canvas)
        if scale != 1:
            image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        frames.append(image)
    return frames


def frame_strip_grid(clips: Clips, scale: int = 2, pad: int = 2, background: int = 64) -> Image.Image:
    """A still image with one row per clip and one column per frame (to look at every frame at once)."""
    array = clips_to_uint8(clips)
    n, f = array.shape[:2]
    # Frame t of clip i becomes a one-frame clip at index i * f + t: row i, column t of the grid.
    stacked = array.reshape(n * f, 1, *array.shape[2:])
    return clip_grid(stacked, ncols=f, scale=scale, pad=pad, background=background)[0]


def save_gif(
    clips: Clips,
    path: str | Path,
    ncols: int | None = None,
    fps: float = 4.0,
    scale: int = 2,
    pad: int = 2,
    loop: int = 0,
) -> Path:
    """Write ``clips`` side by side (see :func:`clip_grid`) as an animated GIF playing at ``fps`` frames per
    second, looping forever (``loop=0``). Returns the path."""
    frames = clip_grid(clips, ncols=ncols, scale=scale, pad=pad)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    duration_ms = max(20, round(1000.0 / fps))
    frames[0].save(
        path,
        save_all=True,
        append_images=frames[1:],
        duration=duration_ms,
        loop=loop,
        optimize=False,
        disposal=1,
    )
    return path
