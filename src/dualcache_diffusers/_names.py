"""Names the command line needs before anything heavy is imported (no torch, no diffusers here)."""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"

# `--model` aliases: the shipped reference pipelines, and whether each is class-conditional
MODEL_ALIASES = {
    "dit": ASSETS_DIR / "dit-digits",
    "pixart": ASSETS_DIR / "pixart-digits",
    "video": ASSETS_DIR / "video-digits",  # a text-to-video LattePipeline (moving digits)
}
CLASS_CONDITIONAL_PIPELINES = ("DiTPipeline",)

# `dualcache bench --methods`: every method of the benchmark, in table order
METHOD_ORDER = (
    "uncached", "steps", "fora", "toca", "duca", "duca-budget", "calibrated", "duca-reuse", "duca-random",
    "duca-attention",
    "fbcache", "taylorseer", "magcache", "pab", "fastercache", "seacache", "dbcache", "dbcache-taylorseer",
    "dbcache-foca",
)

# What the letters of a step pattern and the symbols of a plan summary mean (printed with them).
STEP_PATTERN_LEGEND = (
    "step pattern: one letter per denoising step: F = full (every token computed), C = conservative "
    "(a fraction of the tokens recomputed, the rest from the cache), A = aggressive (the block stack skipped, "
    "or every module's cached output reused), S = skipped call (the denoiser not run, its output forecast), "
    "L = learned (a plan's per-module choice), R = reuse, "
    "? = another step kind, - = not recorded"
)
PLAN_SUMMARY_LEGEND = (
    "per module (attn1 = self-attention, attn2 = cross-attention, ff = MLP): C = compute every token, "
    "P = partial (recompute a fraction of the tokens), R = reuse the cached output; (x.xx) = mean fraction of "
    "tokens computed over the blocks"
)
