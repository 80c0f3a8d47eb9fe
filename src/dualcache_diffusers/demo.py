"""The demo: the same seeds uncached and with DuCa, FORA and ToCa, measured and shown side by side.

For every method (the published preset of the model's family) it measures

* the FLOPs speedup: ``count_flops`` around one whole pipeline call, uncached / cached;
* the wall speedup: all methods timed back to back in one process, ``repeats`` rounds interleaved,
  median per method, uncached median / method median (the FLOPs-counted call is the warm-up);
* PSNR / SSIM of the final images against the uncached images of the same seeds;

and tiles all images into one grid (one row per method, one column per seed). A video pipeline
(the shipped ``video`` LattePipeline) gives clips: PSNR / SSIM are then over all frames, the table
adds the temporal PSNR (consecutive-frame differences against the uncached clip), the grid shows
each clip as a strip of its frames (time downwards), and :func:`save_clip_gif` animates the grid.
"""

from __future__ import annotations

import logging
import statistics
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image, ImageDraw

from . import metrics
from ._names import STEP_PATTERN_LEGEND
from .api import cache_stats, disable_dual_cache, enable_dual_cache
from .bench import Workload, default_conditions
from .reference.digits import DIGIT_WORDS
from .stats import count_flops

logger = logging.getLogger(__name__)

DEMO_METHODS = ("uncached", "duca", "fora", "toca")


@dataclass
class DemoRow:
    method: str
    pattern: str
    flops: int
    images: np.ndarray
    times: list[float] = field(default_factory=list)
    flops_speedup: float = 1.0
    wall_speedup: float = 1.0
    psnr: float = float("inf")
    ssim: float = 1.0
    temporal_psnr: float | None = None  # clips only

    @property
    def median_s(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")


@dataclass
class DemoResult:
    rows: list[DemoRow]
    steps: int
    num_images: int
    conditions: list[Any]
    seeds: list[int] = field(default_factory=list)
    labels: dict[int, str] = field(default_factory=dict)  # class id -> name, for class-conditional pipelines

    @property
    def frames(self) -> int:
        """Frames per clip of a video pipeline; 0 for images."""
        images = self.rows[0].images
        return images.shape[1] if images.ndim == 5 else 0

    def table(self) -> str:
        """A markdown table of the results (clips: PSNR / SSIM over frames, and the temporal PSNR)."""
        temporal = self.frames > 0
        lines = [
            "| method | step pattern | FLOPs speedup | wall speedup | median s | PSNR dB | SSIM |"
            + (" temporal PSNR dB |" if temporal else ""),
            "|---|---|---|---|---|---|---|" + ("---|" if temporal else ""),
        ]
        for r in self.rows:
            lines.append(
                f"| {r.method} | `{r.pattern}` | {r.flops_speedup:.2f}x | {r.wall_speedup:.2f}x | {r.median_s:.3f} "
                f"| {_db(r.psnr)} | {r.ssim:.4f} |" + (f" {_db(r.temporal_psnr)} |" if temporal else "")
            )
        if temporal:
            lines += ["", "PSNR / SSIM: every frame against the same frame of the uncached clip; temporal PSNR: the "
                          "clip's consecutive-frame differences against the uncached clip's (motion fidelity)."]
        lines += ["", STEP_PATTERN_LEGEND + "."]
        return "\n".join(lines) + "\n"

    def column_header(self, index: int) -> str:
        """What column ``index`` of the grid shows: the digit (class) or the prompt, and the seed."""
        condition = self.conditions[index]
        seed = f"seed {self.seeds[index]}" if index < len(self.seeds) else ""
        if isinstance(condition, str):
            return f"{condition}\n{seed}".strip()
        name = self.labels.get(int(condition))
        if name in DIGIT_WORDS:
            what = f"digit {DIGIT_WORDS.index(name)}"
        else:
            what = f"class {condition}" + (f" ({name})" if name else "")
        return f"{what}\n{seed}".strip()


def _db(value: float | None) -> str:
    return "-" if value is None else "inf" if np.isinf(value) else f"{value:.2f}"


def _use(pipe: DiffusionPipeline, method: str) -> None:
    disable_dual_cache(pipe)
    if method != "uncached":
        enable_dual_cache(pipe, method)


def _timed(workload: Workload) -> float:
    device = getattr(workload.pipe, "device", torch.device("cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    workload.generate()
    sync()
    return time.perf_counter() - start


def _measure_flops(workload: Workload, method: str) -> DemoRow:
    _use(workload.pipe, method)
    with count_flops() as counter:
        images = workload.generate()
    if method == "uncached":
        pattern = "F" * workload.steps
    else:
        pattern = "".join(kind[0].upper() for kind in cache_stats(workload.pipe).step_kinds)
    return DemoRow(method, pattern, counter.get_total_flops(), images)


def run_demo(
    pipe: DiffusionPipeline,
    steps: int = 20,
    seed: int = 0,
    num_images: int = 8,
    repeats: int = 3,
    conditions: Sequence[Any] | None = None,
    guidance_scale: float | None = None,
    methods: Sequence[str] = DEMO_METHODS,
    progress: Any = None,
) -> DemoResult:
    """Generate ``num_images`` seeds (``seed``, ``seed + 1``, ...) with every method and measure them.

    ``conditions`` are class ids (DiT) or prompts (PixArt), cycled over the images; by default the
    classes 0, 1, ... or digit captions. ``progress`` gets ``update(1)`` per pipeline call.
    """
    if repeats < 1 or num_images < 1 or steps < 1:
        raise ValueError(f"repeats={repeats}, num_images={num_images} and steps={steps} must all be >= 1")
    methods = ["uncached", *(m for m in methods if m != "uncached")]
    pool = list(conditions) if conditions else default_conditions(pipe, num_images)
    picked = [pool[i % len(pool)] for i in range(num_images)]
    seeds = [seed + i for i in range(num_images)]
    workload = Workload(pipe, steps, seeds, picked, guidance_scale=guidance_scale, paired=True)
    tick = progress.update if progress is not None else (lambda n=1: None)
    try:
        rows = []
        for method in methods:
            rows.append(_measure_flops(workload, method))
            tick(1)
        for _ in range(repeats):  # interleaved: every round times every method once
            for row in rows:
                _use(pipe, row.method)
                row.times.append(_timed(workload))
                tick(1)
    finally:
        disable_dual_cache(pipe)
    _score(rows)
    labels = {v: k for k, v in (getattr(pipe, "labels", None) or {}).items()}  # pipe.labels: name -> id
    return DemoResult(rows, steps, num_images, picked, seeds, labels)


def _score(rows: list[DemoRow]) -> None:
    base = rows[0]
    for row in rows:
        row.flops_speedup = base.flops / max(row.flops, 1)
        row.wall_speedup = base.median_s / row.median_s
        scores = metrics.fidelity(row.images, base.images)
        row.psnr, row.ssim, row.temporal_psnr = scores["psnr"], scores["ssim"], scores["temporal_psnr"]


def _wrap(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` characters (words are kept whole where they fit)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        lines += textwrap.wrap(paragraph, max(1, width), break_long_words=True) or [""]
    return lines


def _tiles(images: np.ndarray, frame: int | None = None) -> np.ndarray:
    """The grid's cells [N, H, W, C]: the images; of clips [N, F, H, W, C] frame ``frame``, or by default
    each clip's frames stacked top to bottom (one strip per clip)."""
    if images.ndim == 4:
        return images
    if frame is not None:
        return images[:, frame]
    n, f, h, w, c = images.shape
    return images.reshape(n, f * h, w, c)


def image_grid(result: DemoResult, scale: int | None = None, pad: int = 2, frame: int | None = None) -> Image.Image:
    """One row per method (labelled on the left), one column per image; each column's header says what it
    shows (the digit or the whole prompt) and its seed. Clips show as frame strips, or only ``frame``."""
    first = _tiles(result.rows[0].images, frame)
    frame_h, frame_w = result.rows[0].images.shape[-3:-1]
    height, width = first.shape[1:3]
    scale = scale or max(1, (64 if result.frames and frame is None else 96) // max(frame_h, frame_w))
    cell_w, cell_h = width * scale, height * scale
    char_w, line_h = 6, 11  # PIL's default bitmap font
    headers = [_wrap(result.column_header(c), cell_w // char_w) for c in range(len(first))]
    label_w, header_h = 90, 4 + line_h * max((len(h) for h in headers), default=1)
    size = (label_w + len(first) * (cell_w + pad) + pad, header_h + len(result.rows) * (cell_h + pad) + pad)
    grid = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(headers):
        for i, line in enumerate(lines):
            draw.text((label_w + pad + c * (cell_w + pad), 2 + i * line_h), line, fill=(0, 0, 0))
    for r, row in enumerate(result.rows):
        top = header_h + pad + r * (cell_h + pad)
        draw.text((4, top + cell_h // 2 - 12), row.method, fill=(0, 0, 0))
        draw.text((4, top + cell_h // 2 + 2), f"{row.flops_speedup:.2f}x FLOPs", fill=(90, 90, 90))
        for c, image in enumerate(_tiles(row.images, frame)):
            tile = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8).squeeze())
            tile = tile.convert("RGB").resize((cell_w, cell_h), Image.NEAREST)
            grid.paste(tile, (label_w + pad + c * (cell_w + pad), top))
    return grid


def save_clip_gif(result: DemoResult, path: str | Path, fps: float = 4.0) -> Path:
    """The grid of a video demo (one row per method, one column per caption), animated: one GIF frame per
    clip frame, written with :func:`video.save_gif`. Returns the path."""
    from .video import save_gif

    if not result.frames:
        raise ValueError("save_clip_gif needs a demo of a video pipeline (clips, not images)")
    frames = np.stack([np.asarray(image_grid(result, frame=t)) for t in range(result.frames)])
    return save_gif(frames[None], path, fps=fps, scale=1, pad=0)
