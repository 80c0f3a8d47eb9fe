"""Fidelity benchmark: every caching method at matched compute budgets.

For each method and each budget (a target FLOPs reduction such as 2x) a calibration search on a
few held-out seeds picks the method's knob (FORA's interval, ToCa/DuCa's interval then fresh
ratio, a baseline's ``sweep_knob``, or the number of denoising steps) so that the FLOPs ratio,
measured with :func:`count_flops` around whole pipeline calls, lands near the target. The chosen
setting then generates every evaluation image (many seeds x every class / several prompts), and
the row records the FLOPs ratio achieved on those images, PSNR and SSIM against the uncached image
of the same seed, and, when the digits classifier is available, the Frechet distance to the real
test digits in its feature space and the accuracy against the requested digit. Video pipelines
(LattePipeline) generate clips: PSNR / SSIM / classifier metrics are then taken over all frames,
and a temporal PSNR (consecutive-frame differences against the uncached clip) is added.

The pieces are usable on their own: :class:`Workload` (what to generate), :data:`METHODS` (how to
apply each method), :class:`Calibrator` (the knob search) and :func:`run_benchmark`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline

from . import metrics
from ._names import METHOD_ORDER, MODEL_ALIASES, STEP_PATTERN_LEGEND
from .api import cache_stats, disable_dual_cache, enable_dual_cache, get_engine
from .plan import CachePlan
from .stats import count_flops

logger = logging.getLogger(__name__)

Setting = dict[str, Any]
Undo = Callable[[], None]

# ----------------------------------------------------------------------------------------------- models


def model_aliases() -> dict[str, Path]:
    """Short names for the shipped reference pipelines."""
    return dict(MODEL_ALIASES)


def resolve_model(model: str) -> str:
    """``dit`` / ``pixart`` / ``video`` -> the shipped pipeline directory; anything else is a local dir or a Hub id."""
    return str(model_aliases().get(model, model))


def load_pipeline(model: str, device: str = "cpu", dtype: str = "float32") -> DiffusionPipeline:
    """Load any supported pipeline with ``DiffusionPipeline.from_pretrained`` (progress bars off)."""
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype; use float32, float16 or bfloat16")
    pipe = DiffusionPipeline.from_pretrained(resolve_model(model), dtype=torch_dtype).to(device)
    if not isinstance(getattr(pipe, "transformer", None), torch.nn.Module):
        raise TypeError(f"{type(pipe).__name__} from {model!r} has no diffusion transformer; nothing to cache")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def is_class_conditional(pipe: DiffusionPipeline) -> bool:
    return callable(getattr(pipe, "get_label_ids", None))


def is_video(pipe: DiffusionPipeline) -> bool:
    """A text-to-video pipeline (its call takes ``video_length``, as LattePipeline's does)."""
    import inspect

    return "video_length" in inspect.signature(type(pipe).__call__).parameters


def default_conditions(pipe: DiffusionPipeline, count: int = 10) -> list[int] | list[str]:
    """Every class (up to ``count``) of a class-conditional pipeline, or ``count`` digit (or motion) captions."""
    if is_class_conditional(pipe):
        labels = getattr(pipe, "labels", None) or {}
        num_classes = len(labels) or 1000
        return list(range(min(count, num_classes)))
    return motion_captions(count) if is_video(pipe) else digit_captions(count)


def digit_captions(count: int = 10) -> list[str]:
    """Captions the shipped PixArt digits model understands, every digit, varied adjectives."""
    from .reference import digits

    adjectives = [(), ("thick",), ("thin",), ("slanted",), ("upright",), ("thick", "upright"), ("thin", "slanted")]
    return [digits.caption_for(i % 10, adjectives[(i * 3) % len(adjectives)]) for i in range(count)]


def motion_captions(count: int = 10) -> list[str]:
    """Captions of the shipped video model: every digit, the four directions in turn ("a seven moving up")."""
    from .reference import moving_digits

    directions = moving_digits.DIRECTIONS
    return [moving_digits.caption_for(i % 10, directions[i % len(directions)]) for i in range(count)]


def condition_digit(pipe: DiffusionPipeline, condition: int | str) -> int | None:
    """The digit an image was asked to show (class name or caption), or None."""
    if isinstance(condition, str):
        return metrics.digit_of_text(condition)
    names = {v: k for k, v in (getattr(pipe, "labels", None) or {}).items()}  # pipe.labels: name -> id
    return metrics.digit_of_text(names.get(condition, "")) if names else None


def text_call_kwargs(pipe: DiffusionPipeline) -> dict[str, Any]:
    """Keyword arguments of a text-to-image pipeline: ``PIXART_CALL_KWARGS`` for the shipped PixArt (its 32 px
    images, resolution binning on); for another one no caption cleaning, generation at the transformer's own
    size (no resolution binning: the same at the default size of PixArt's checkpoints, needed for models outside
    the bins) and the prompt length capped by the tokenizer."""
    import inspect

    from .reference.digits import PIXART_CALL_KWARGS, PIXART_DIGITS_DIR

    if Path(pipe.name_or_path).resolve() == PIXART_DIGITS_DIR.resolve():
        return dict(PIXART_CALL_KWARGS)
    params = inspect.signature(type(pipe).__call__).parameters
    kwargs: dict[str, Any] = {}
    for name, value in (("clean_caption", False), ("use_resolution_binning", False)):
        if name in params:
            kwargs[name] = value
    if "max_sequence_length" in params:
        default = params["max_sequence_length"].default
        limit = getattr(getattr(pipe, "tokenizer", None), "model_max_length", default) or default
        kwargs["max_sequence_length"] = int(min(default, limit))
    return kwargs


def video_call_kwargs(pipe: DiffusionPipeline) -> dict[str, Any]:
    """Keyword arguments of a video pipeline: ``LATTE_CALL_KWARGS`` for the shipped model; for another one the
    number of frames and the size its transformer was built for."""
    from .reference.moving_digits import LATTE_CALL_KWARGS, VIDEO_DIGITS_DIR

    if Path(pipe.name_or_path).resolve() == VIDEO_DIGITS_DIR.resolve():
        return dict(LATTE_CALL_KWARGS)
    config = pipe.transformer.config
    size = config.sample_size * pipe.vae_scale_factor
    return {"video_length": config.video_length, "height": size, "width": size}


# --------------------------------------------------------------------------------------------- workload


@dataclass
class Workload:
    """The images to generate, each with its own generator seeded by its seed.

    One image per (seed, condition) of the product ``seeds x conditions`` (seed-major), or with
    ``paired=True`` one per ``zip(seeds, conditions)``.
    """

    pipe: DiffusionPipeline
    steps: int
    seeds: list[int]
    conditions: list[int] | list[str]
    guidance_scale: float | None = None
    batch_size: int = 32
    paired: bool = False
    items: list[tuple[int, int | str]] = field(init=False)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        if not self.seeds or not self.conditions:
            raise ValueError("a workload needs at least one seed and one condition")
        if self.paired and len(self.seeds) != len(self.conditions):
            raise ValueError(f"paired workload: {len(self.seeds)} seeds but {len(self.conditions)} conditions")
        pairs = zip(self.seeds, self.conditions) if self.paired else _product(self.seeds, self.conditions)
        self.items = list(pairs)

    def __len__(self) -> int:
        return len(self.items)

    def labels(self) -> list[int] | None:
        """Requested digit per image, or None when some condition names no digit."""
        digits = [condition_digit(self.pipe, cond) for _, cond in self.items]
        return None if any(d is None for d in digits) else digits

    def call_kwargs(self, items: Sequence[tuple[int, int | str]], steps: int | None = None) -> dict[str, Any]:
        """Keyword arguments of one pipeline call generating ``items``."""
        kwargs: dict[str, Any] = {
            "num_inference_steps": steps or self.steps,
            "generator": [torch.Generator("cpu").manual_seed(seed) for seed, _ in items],
            "output_type": "np",
        }
        if self.guidance_scale is not None:
            kwargs["guidance_scale"] = self.guidance_scale
        conditions = [cond for _, cond in items]
        if is_class_conditional(self.pipe):
            return {"class_labels": conditions, **kwargs}
        video = video_call_kwargs(self.pipe) if is_video(self.pipe) else {}
        return {"prompt": conditions, **text_call_kwargs(self.pipe), **video, **kwargs}

    def generate(self, steps: int | None = None) -> np.ndarray:
        """All images as float [N, H, W, C] in [0, 1]; for a video pipeline all clips as [N, F, H, W, C]."""
        chunks = [self.items[i : i + self.batch_size] for i in range(0, len(self.items), self.batch_size)]
        with torch.inference_mode():
            outputs = [self.pipe(**self.call_kwargs(chunk, steps)) for chunk in chunks]
        return np.concatenate([np.asarray(_output_array(o), dtype=np.float32) for o in outputs])


def _output_array(output: Any) -> Any:
    """``.images`` of an image pipeline's output, ``.frames`` of a video pipeline's."""
    return output.frames if hasattr(output, "frames") and not hasattr(output, "images") else output.images


def _product(seeds: Sequence[int], conditions: Sequence[Any]) -> Iterable[tuple[int, Any]]:
    return ((seed, cond) for seed in seeds for cond in conditions)


# ---------------------------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Knob:
    """A setting swept by the calibration search; ``faster_when`` says which direction saves compute."""

    name: str
    low: float
    high: float
    integer: bool = False
    log: bool = False
    faster_when: str = "higher"


@dataclass
class Method:
    """One row family of the benchmark: how to apply it and which knob trades compute for fidelity.

    ``apply(workload, setting)`` turns the method on and returns an undo function; ``steps(setting)``
    is the number of denoising steps it runs (only "fewer steps" changes it).
    """

    name: str
    description: str
    apply: Callable[[Workload, Setting], Undo]
    knob: Knob | None = None
    fine_knob: Knob | None = None  # refined after the (integer) knob, e.g. DuCa's fresh_ratio
    start: Setting = field(default_factory=dict)  # knob values used before / besides the search
    steps: Callable[[Setting, int], int] = lambda setting, steps: steps
    family: str = "dualcache"  # reference | steps | dualcache | plan | baseline
    #: take the setting another method's search found at each budget (a method too costly to search itself)
    search_as: str | None = None


def _no_op(workload: Workload, setting: Setting) -> Undo:
    return lambda: None


def _dual_cache(preset: str, **fixed: Any) -> Callable[[Workload, Setting], Undo]:
    def apply(workload: Workload, setting: Setting) -> Undo:
        enable_dual_cache(workload.pipe, preset, **fixed, **setting)
        return lambda: disable_dual_cache(workload.pipe)

    return apply


def _dual_cache_method(name: str, preset: str, description: str, **fixed: Any) -> Method:
    interval = Knob("interval", 2, 64, integer=True)
    # FORA has no token knob: its leading full steps bring the FLOPs nearer a budget no interval meets
    fine = (Knob("fresh_ratio", 0.0, 1.0, faster_when="lower") if preset != "fora"
            else Knob("first_full_steps", 1, 64, integer=True, faster_when="lower"))
    return Method(name, description, _dual_cache(preset, **fixed), knob=interval, fine_knob=fine)


def _budget_method() -> Method:
    """``enable_dual_cache(pipe, budget=b)``, the default: the knob is the denoiser budget ``b``, searched so that
    the whole pipeline's FLOPs (VAE decode included, which no cache saves) meet the row's budget."""

    def apply(workload: Workload, setting: Setting) -> Undo:
        enable_dual_cache(workload.pipe, budget=setting["budget"])
        return lambda: disable_dual_cache(workload.pipe)

    return Method("duca-budget", "enable_dual_cache(pipe, budget=b): the budget rule (default)", apply,
                  knob=Knob("budget", 1.01, 10.0, log=True))


#: seeds the `calibrated` method calibrates on: apart from the evaluation seeds (0, 1, ...) and the knob search's
CALIBRATE_SEEDS = (2000, 2001)
CALIBRATE_CONDITIONS = 10  # 20 images: with 8, selection noise made a calibrated plan lose to the default twice
_CALIBRATED: weakref.WeakKeyDictionary[DiffusionPipeline, dict[tuple, CachePlan]] = weakref.WeakKeyDictionary()


def calibration_workload(workload: Workload) -> Workload:
    """The images `calibrated` searches its schedule on: :data:`CALIBRATE_SEEDS` x a spread of the conditions."""
    conditions = list(workload.conditions)
    step = max(1, len(conditions) // CALIBRATE_CONDITIONS)
    conditions = conditions[::step][:CALIBRATE_CONDITIONS]
    seeds = list(CALIBRATE_SEEDS)
    return dataclasses.replace(workload, seeds=seeds, conditions=conditions, batch_size=len(seeds) * len(conditions),
                               paired=False)


def _calibrated_method() -> Method:
    """A plan from ``dualcache calibrate`` (its whole search) at the budget ``duca-budget`` found (so at the same
    FLOPs), calibrated on :data:`CALIBRATE_SEEDS`, never on the evaluation images."""

    def apply(workload: Workload, setting: Setting) -> Undo:
        from .calibrate import calibrate

        plans = _CALIBRATED.setdefault(workload.pipe, {})
        key = (workload.steps, workload.guidance_scale, round(float(setting["budget"]), 6))
        if key not in plans:
            plans[key] = calibrate(workload.pipe, calibration_workload(workload), setting["budget"])
        enable_dual_cache(workload.pipe, plan=plans[key])
        return lambda: disable_dual_cache(workload.pipe)

    return Method("calibrated", "dualcache calibrate --budget b (seeds 2000-2001), its plan", apply,
                  knob=Knob("budget", 1.01, 10.0, log=True), search_as="duca-budget", family="plan")


def _plan_method(name: str, path: Path) -> Method:
    def apply(workload: Workload, setting: Setting) -> Undo:
        enable_dual_cache(workload.pipe, plan=path)
        return lambda: disable_dual_cache(workload.pipe)

    return Method(name, f"learned plan {path.name}", apply, family="plan")


# Knobs of diffusers' caches fixed for the benchmark (the sweep knob is searched). Caps that would make the
# larger budgets unreachable whatever the threshold are lifted to the step count; see docs of each cache.
def _baseline_fixed_knobs(name: str, steps: int) -> Setting:
    if name.startswith("cachedit_dbcache"):  # DBCache with any of its calibrators
        return {"max_warmup_steps": max(1, steps // 10), "num_inference_steps": steps}
    return {
        "taylorseer": {"disable_cache_before_step": max(1, min(3, steps // 6))},
        "magcache": {"max_skip_steps": steps, "num_inference_steps": steps},
        "seacache": {"max_consecutive_cached": steps},
    }.get(name, {})


def _baseline_knob(name: str, steps: int) -> Knob:
    from .baselines import BASELINES

    spec = BASELINES[name]
    if spec.sweep_knob in ("cache_interval", "spatial_skip_range", "uncond_skip_range"):
        return Knob(spec.sweep_knob, 1, steps, integer=True, faster_when=spec.faster_when)
    return Knob(spec.sweep_knob, 1e-3, 10.0, log=True, faster_when=spec.faster_when)


def _baseline_fine_knob(name: str, steps: int) -> Knob | None:
    """A second knob of the baseline's own, searched when its sweep knob (an integer) misses the budget."""
    if name == "taylorseer":  # warm-up steps computed in full before the first forecast
        return Knob("disable_cache_before_step", 1, max(1, steps - 1), integer=True, faster_when="lower")
    return None


def _baseline_method(name: str, description: str) -> Method:
    def apply(workload: Workload, setting: Setting) -> Undo:
        from .baselines import apply_baseline, calibrate_mag_ratios, remove_baseline

        knobs = {**_baseline_fixed_knobs(name, workload.steps), **setting}
        if name == "magcache" and "mag_ratios" not in knobs:
            knobs["mag_ratios"] = _mag_ratios(workload, calibrate_mag_ratios)
        if name == "fastercache" and workload.guidance_scale is not None and workload.guidance_scale <= 1.0:
            raise ValueError("fastercache needs classifier-free guidance (guidance_scale > 1)")
        handle = apply_baseline(workload.pipe, name, **knobs)
        return lambda: remove_baseline(workload.pipe, handle)

    return Method(name, description, apply, family="baseline")


_MAG_RATIOS: weakref.WeakKeyDictionary[DiffusionPipeline, dict[int, list[float]]] = weakref.WeakKeyDictionary()


def _mag_ratios(workload: Workload, calibrate: Callable[..., list[float]]) -> list[float]:
    """MagCache's residual-magnitude ratios, calibrated once per pipeline and step count on one image."""
    per_steps = _MAG_RATIOS.setdefault(workload.pipe, {})
    if workload.steps not in per_steps:
        per_steps[workload.steps] = calibrate(workload.pipe, **workload.call_kwargs(workload.items[:1]))
    return per_steps[workload.steps]


def build_methods(steps: int, plans: dict[str, Path] | None = None) -> dict[str, Method]:
    """Every benchmark method by name (baselines whose package is missing are left out with a warning)."""
    from .baselines import BASELINES

    methods = {
        "uncached": Method("uncached", "every step computed (reference)", _no_op, family="reference"),
        "steps": Method(
            "steps", "fewer denoising steps, same scheduler", _no_op,
            # from 2: a one-step call is no sampler, and PixArt's pipeline special-cases it (it reads
            # the scheduler's second output, which DPM-Solver does not return)
            knob=Knob("num_inference_steps", 2, steps, integer=True, faster_when="lower"),
            steps=lambda setting, default: setting.get("num_inference_steps", default), family="steps",
        ),
        "fora": _dual_cache_method("fora", "fora", "FORA: full step every N, all modules reused between"),
        "toca": _dual_cache_method("toca", "toca", "ToCa: full / conservative (token-wise partial) steps"),
        "duca": _dual_cache_method("duca", "duca", "DuCa, aggressive=skip, V-caching selection",
                                   aggressive="skip", selection="vnorm"),
        "duca-budget": _budget_method(),
        "calibrated": _calibrated_method(),
        "duca-reuse": _dual_cache_method("duca-reuse", "duca", "DuCa, aggressive=reuse (FORA-style aggressive step)",
                                         aggressive="reuse", selection="vnorm"),
        "duca-random": _dual_cache_method("duca-random", "duca", "DuCa, random token selection",
                                          aggressive="skip", selection="random"),
        "duca-attention": _dual_cache_method("duca-attention", "duca", "DuCa, ToCa attention-score selection",
                                             aggressive="skip", selection="attention"),
    }
    for name, spec in BASELINES.items():
        alias = _alias(name)
        if not spec.is_available():
            logger.warning("baseline %s skipped: %s", alias, unavailable_methods()[alias])
            continue
        method = _baseline_method(name, spec.summary.split(":")[0])
        method.knob = _baseline_knob(name, steps)
        method.fine_knob = _baseline_fine_knob(name, steps)
        methods[alias] = dataclasses.replace(method, name=alias)
    for name, path in (plans or {}).items():
        methods[name] = _plan_method(name, Path(path))
    return methods


def _alias(baseline: str) -> str:
    """The benchmark's name of a baseline: cache-dit's ``cachedit_dbcache[_calibrator]`` -> ``dbcache[-calibrator]``."""
    return baseline.replace("cachedit_dbcache", "dbcache").replace("_", "-")


def unavailable_methods() -> dict[str, str]:
    """Benchmark methods that cannot run in this environment, with the reason."""
    from .baselines import BASELINES

    return {
        _alias(name): f"needs the optional package {spec.requires!r} (pip install 'dualcache-diffusers[cachedit]')"
        for name, spec in BASELINES.items()
        if not spec.is_available()
    }




# ------------------------------------------------------------------------------------------ measurement


@dataclass
class Generation:
    images: np.ndarray
    flops: int
    pattern: str


def generate_with(method: Method, workload: Workload, setting: Setting) -> Generation:
    """Apply ``method`` with ``setting``, generate the workload counting FLOPs, undo the method."""
    undo = method.apply(workload, setting)
    try:
        with count_flops() as counter:
            images = workload.generate(steps=method.steps(setting, workload.steps))
        pattern = _step_pattern(method, workload, setting)
    finally:
        undo()
    return Generation(images, counter.get_total_flops(), pattern)


def _step_pattern(method: Method, workload: Workload, setting: Setting) -> str:
    if method.family in ("reference", "steps"):
        return "F" * method.steps(setting, workload.steps)
    if get_engine(workload.pipe) is not None:
        return "".join(kind[0].upper() for kind in cache_stats(workload.pipe).step_kinds)
    return "-"


def _log_gap(ratio: float, target: float) -> float:
    return abs(math.log(max(ratio, 1e-9) / target))


class Calibrator:
    """Finds, per method and budget, the knob setting whose measured FLOPs ratio is nearest the budget.

    Measurements are cached per (method, setting), so budgets share evaluations. The search assumes the
    ratio is monotone in the knob (true for schedules; roughly true for the adaptive baselines).
    """

    def __init__(self, workload: Workload, tolerance: float = 0.03, float_iterations: int = 10,
                 precision: float = 0.005) -> None:
        self.workload = workload
        self.tolerance = math.log1p(tolerance)
        #: a continuous knob is bisected until its ratio is this close to the target (or the iterations run out):
        #: landing anywhere within the 3% tolerance left our 2x DiT row at 2.11x against TaylorSeer's 2.06x, one
        #: full step fewer than the budget gave at 2.06x
        self.precision = math.log1p(precision)
        self.float_iterations = float_iterations
        self.uncached_flops = generate_with(build_reference(), workload, {}).flops
        self._ratios: dict[tuple[str, str], float] = {}

    def ratio(self, method: Method, setting: Setting) -> float:
        key = (method.name, json.dumps(setting, sort_keys=True, default=str))
        if key not in self._ratios:
            if method.family in ("dualcache", "plan"):
                flops = self._engine_pipeline_flops(method, setting)
            else:
                flops = generate_with(method, self.workload, setting).flops
            self._ratios[key] = self.uncached_flops / max(flops, 1)
            logger.info("calibration %s %s -> %.3fx", method.name, setting, self._ratios[key])
        return self._ratios[key]

    def _engine_pipeline_flops(self, method: Method, setting: Setting) -> int:
        """Pipeline FLOPs of a dual-cache method from the engine's own count, without the (slow) counter.

        The engine counts what its denoiser did and what it would have done uncached, matching
        FlopCounterMode (tests/test_engine.py checks that); everything outside the denoiser is the same
        as in the uncached call measured by the counter. The evaluation run then measures with the counter.
        """
        undo = method.apply(self.workload, setting)
        try:
            self.workload.generate()
            stats = cache_stats(self.workload.pipe)
        finally:
            undo()
        return self.uncached_flops - stats.flops_uncached + stats.flops

    def search(self, method: Method, target: float) -> tuple[Setting, float]:
        """The setting of ``method`` nearest ``target`` FLOPs reduction, and its calibration ratio."""
        setting = dict(method.start)
        if method.knob is None:
            return setting, self.ratio(method, setting)
        setting, ratio = self._search_knob(method, method.knob, setting, target)
        if method.fine_knob is not None and _log_gap(ratio, target) > self.tolerance:
            for base in self._bracket(method, setting, ratio, target):
                fine, fine_ratio = self._search_knob(method, method.fine_knob, base, target)
                if _log_gap(fine_ratio, target) < _log_gap(ratio, target):
                    setting, ratio = fine, fine_ratio
        return setting, ratio

    def _bracket(self, method: Method, setting: Setting, ratio: float, target: float) -> list[Setting]:
        """The coarse setting found and, for an integer knob, its neighbour on the other side of the target:
        the fine knob can then close the gap from either side (e.g. TaylorSeer's warm-up steps lower the
        ratio, so a larger interval with more warm-up can land where no interval alone does)."""
        knob = method.knob
        assert knob is not None
        if not knob.integer:
            return [setting]
        step = 1 if (ratio < target) == (knob.faster_when == "higher") else -1
        neighbour = setting.get(knob.name, knob.low) + step
        in_range = knob.low <= neighbour <= self._high(knob)
        return [setting] + ([{**setting, knob.name: neighbour}] if in_range else [])

    def _high(self, knob: Knob) -> float:
        """The knob's upper bound; intervals and step counts stop at the workload's step count."""
        if knob.integer and knob.name in ("interval", "num_inference_steps"):
            return min(knob.high, self.workload.steps)
        return knob.high

    def _search_knob(self, method: Method, knob: Knob, base: Setting, target: float) -> tuple[Setting, float]:
        low, high = knob.low, self._high(knob)
        best: tuple[float, Setting, float] | None = None

        def evaluate(value: float) -> float:
            nonlocal best
            value = round(value) if knob.integer else float(value)
            setting = {**base, knob.name: value}
            ratio = self.ratio(method, setting)
            if best is None or _log_gap(ratio, target) < best[0]:
                best = (_log_gap(ratio, target), setting, ratio)
            return ratio if knob.faster_when == "higher" else -ratio  # increasing in the value

        goal = target if knob.faster_when == "higher" else -target
        if evaluate(high) > goal and evaluate(low) < goal:
            self._bisect(evaluate, low, high, goal, knob)
        assert best is not None
        return best[1], best[2]

    def _bisect(self, evaluate: Callable[[float], float], low: float, high: float, goal: float, knob: Knob) -> None:
        for _ in range(64 if knob.integer else self.float_iterations):
            if knob.integer and high - low <= 1:
                return
            mid = math.sqrt(low * high) if knob.log else (low + high) / 2
            mid = round(mid) if knob.integer else mid
            if knob.integer:
                mid = min(max(mid, int(low) + 1), int(high) - 1)
            value = evaluate(mid)
            if abs(value - goal) <= (self.tolerance if knob.integer else self.precision) * abs(goal):
                return
            low, high = (mid, high) if value < goal else (low, mid)


def build_reference() -> Method:
    return Method("uncached", "every step computed (reference)", _no_op, family="reference")


# ------------------------------------------------------------------------------------------------ rows


@dataclass
class Quality:
    """Quality of one image set against the uncached images of the same seeds."""

    psnr: float
    ssim: float
    fd: float | None = None
    accuracy: float | None = None
    temporal_psnr: float | None = None  # clips only: PSNR of consecutive-frame differences


class Judge:
    """Scores image sets (or clip sets, over their frames): PSNR / SSIM vs the reference (for clips also the
    temporal PSNR), Frechet distance and accuracy with the classifier."""

    def __init__(self, reference: np.ndarray, classifier: Any = None, labels: list[int] | None = None) -> None:
        self.reference = reference
        self.classifier = classifier
        self.labels = labels

    def __call__(self, images: np.ndarray) -> Quality:
        quality = Quality(**metrics.fidelity(images, self.reference))
        if self.classifier is not None:
            frames, labels = images, self.labels
            if images.ndim == 5:  # every frame is an image of the requested digit
                frames = images.reshape(-1, *images.shape[2:])
                labels = None if labels is None else [d for d in labels for _ in range(images.shape[1])]
            quality.fd = metrics.frechet_distance_to_real(self.classifier, frames)
            if labels is not None:
                quality.accuracy = metrics.classifier_accuracy(self.classifier, frames, labels)
        return quality


@dataclass
class BenchRow:
    method: str
    budget: float | None  # target FLOPs reduction; None for rows without a knob
    setting: Setting
    flops_ratio: float  # achieved on the evaluation images
    calibration_ratio: float
    quality: Quality
    pattern: str
    description: str = ""
    family: str = ""

    @property
    def reached(self) -> bool:
        return self.budget is None or _log_gap(self.flops_ratio, self.budget) <= math.log(1.1)

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "budget": "" if self.budget is None else self.budget,
            "setting": json.dumps(self.setting, sort_keys=True),
            "flops_ratio": round(self.flops_ratio, 4),
            "calibration_ratio": round(self.calibration_ratio, 4),
            "reached": self.reached,
            "psnr": round(self.quality.psnr, 3),
            "ssim": round(self.quality.ssim, 4),
            "fd": "" if self.quality.fd is None else round(self.quality.fd, 4),
            "accuracy": "" if self.quality.accuracy is None else round(self.quality.accuracy, 4),
            "temporal_psnr": "" if self.quality.temporal_psnr is None else round(self.quality.temporal_psnr, 3),
            "pattern": self.pattern,
            "description": self.description,
        }


@dataclass
class BenchConfig:
    budgets: Sequence[float] = (1.5, 2.0, 2.5, 3.0, 4.0)
    calibration_seeds: Sequence[int] = (1000, 1001)
    calibration_conditions: int = 2
    #: also run this method (e.g. "duca-budget") at the FLOPs every other method achieved, where that is more
    #: than :data:`MATCH_TOLERANCE` away from its own row at the same budget (integer knobs and adaptive
    #: caches cannot always land near the budget; a continuous budget can land near them)
    match_to: str | None = None


MATCH_TOLERANCE = 0.03


@dataclass
class BenchResult:
    rows: list[BenchRow]
    skipped: dict[str, str]
    num_images: int
    steps: int
    model: str = ""
    has_classifier: bool = False
    notes: list[str] = field(default_factory=list)
    frames: int = 0  # frames per clip of a video pipeline; 0 for images

    @property
    def counts(self) -> str:
        """'100 images, 20 steps' ('10 clips x 8 frames, 20 steps'), or '' when unknown (results merged from CSV)."""
        if not self.num_images:
            return ""
        what = f"{self.num_images} clips x {self.frames} frames" if self.frames else f"{self.num_images} images"
        return f"{what}, {self.steps} steps"

    @property
    def has_temporal(self) -> bool:
        return any(r.quality.temporal_psnr is not None for r in self.rows)


class _Progress:
    """What the benchmark reports progress to (the CLI passes a tqdm bar)."""

    def update(self, n: int = 1) -> None: ...

    def set_postfix_str(self, text: str) -> None: ...


def count_jobs(methods: Iterable[Method], budgets: Sequence[float]) -> int:
    return sum(len(budgets) if m.knob is not None else 1 for m in methods)


def run_benchmark(
    workload: Workload,
    methods: dict[str, Method],
    config: BenchConfig,
    classifier: Any = None,
    progress: Any = None,
) -> BenchResult:
    """Calibrate and evaluate every method at every budget; failures of one method skip only that method."""
    progress = progress or _Progress()
    calibration = _calibration_workload(workload, config)
    calibrator = Calibrator(calibration)
    reference = generate_with(build_reference(), workload, {})
    judge = Judge(reference.images, classifier, workload.labels())
    frames = reference.images.shape[1] if reference.images.ndim == 5 else 0
    result = BenchResult([], {}, len(workload), workload.steps, has_classifier=classifier is not None, frames=frames)
    for method in methods.values():
        budgets: list[float | None] = list(config.budgets) if method.knob is not None else [None]
        searcher = methods.get(method.search_as) or build_methods(workload.steps).get(method.search_as) \
            if method.search_as else None
        try:
            result.rows += _evaluate_method(method, budgets, workload, calibrator, reference, judge, progress,
                                            searcher)
        except Exception as error:  # a competitor that cannot run on this model is skipped, not fatal
            logger.warning("method %s skipped: %s: %s", method.name, type(error).__name__, error)
            result.skipped[method.name] = f"{type(error).__name__}: {error}"
            progress.update(len(budgets))
    if config.match_to in methods:
        matched = methods[config.match_to]
        targets = _match_targets(result.rows, matched.name)
        if targets:
            _grow_progress(progress, len(targets))
            rows = _evaluate_method(matched, list(targets), workload, calibrator, reference, judge, progress)
            for row in rows:
                row.description = f"{matched.name} at the FLOPs of {targets[row.budget]}"
            result.rows += rows
            result.notes.append(
                f"{matched.name} rows at budgets other than those asked for: run at the FLOPs ratio another method "
                f"achieved (where that was more than {MATCH_TOLERANCE:.0%} from its own row at the same budget), so "
                f"that every comparison has a pair within {MATCH_TOLERANCE:.0%}: "
                + "; ".join(f"{t:g}x = {who}" for t, who in targets.items()))
    return result


def _match_targets(rows: Sequence[BenchRow], ours: str) -> dict[float, str]:
    """FLOPs ratios other methods achieved more than 3% away from ``ours`` at the same budget: the ratio
    (rounded to 3 decimals; ratios within 1% share one run) -> which rows it matches."""
    own = {r.budget: r.flops_ratio for r in rows if r.method == ours and r.budget is not None}
    targets: dict[float, str] = {}
    for row in rows:
        if row.method == ours or row.budget not in own or row.family in ("reference", "plan"):
            continue
        if _log_gap(row.flops_ratio, own[row.budget]) <= math.log1p(MATCH_TOLERANCE):
            continue
        near = next((t for t in targets if _log_gap(row.flops_ratio, t) <= math.log1p(0.01)), None)
        label = f"{row.method} at {row.budget:g}x"
        if near is None:
            targets[round(row.flops_ratio, 3)] = label
        else:
            targets[near] += f", {label}"
    return targets


def _grow_progress(progress: Any, jobs: int) -> None:
    if getattr(progress, "total", None) is not None:
        progress.total += jobs
        progress.refresh()


def _calibration_workload(workload: Workload, config: BenchConfig) -> Workload:
    step = max(1, len(workload.conditions) // max(1, config.calibration_conditions))
    conditions = list(workload.conditions)[::step][: config.calibration_conditions]
    seeds = list(config.calibration_seeds)
    # one pipeline call, so that cache_stats covers the whole calibration generation
    return dataclasses.replace(workload, seeds=seeds, conditions=conditions, batch_size=len(seeds) * len(conditions))


def _evaluate_method(
    method: Method,
    budgets: list[float | None],
    workload: Workload,
    calibrator: Calibrator,
    reference: Generation,
    judge: Judge,
    progress: Any,
    searcher: Method | None = None,
) -> list[BenchRow]:
    rows: list[BenchRow] = []
    done: dict[str, tuple[Generation, Quality]] = {}
    for budget in budgets:
        progress.set_postfix_str(f"{method.name} @ {budget or '-'}x")
        if budget is None:
            setting, calib_ratio = dict(method.start), calibrator.ratio(method, dict(method.start))
        else:
            setting, calib_ratio = calibrator.search(searcher or method, budget)
        key = json.dumps(setting, sort_keys=True, default=str)
        if key not in done:
            generation = reference if method.family == "reference" else generate_with(method, workload, setting)
            done[key] = (generation, judge(generation.images))
        generation, quality = done[key]
        ratio = reference.flops / max(generation.flops, 1)
        rows.append(BenchRow(method.name, budget, setting, ratio, calib_ratio, quality, generation.pattern,
                             method.description, method.family))
        progress.update(1)
    return rows


# --------------------------------------------------------------------------------------------- reports


CSV_FIELDS = ("method", "budget", "setting", "flops_ratio", "calibration_ratio", "reached", "psnr", "ssim", "fd",
              "accuracy", "temporal_psnr", "pattern", "description")
OPTIONAL_CSV_FIELDS = ("temporal_psnr",)  # absent from results.csv files written before it existed


def write_csv(result: BenchResult, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in result.rows:
            writer.writerow(row.as_dict())


def _family(method: str) -> str:
    """The plot family of a method name read back from a CSV (any unknown name is a learned plan)."""
    from .baselines import BASELINES

    if method == "uncached":
        return "reference"
    if method == "steps":
        return "steps"
    if method in METHOD_ORDER:
        return "baseline" if method in {_alias(name) for name in BASELINES} else "dualcache"
    return "plan"


def _optional_float(text: str) -> float | None:
    return None if text == "" else float(text)


def read_csv(path: Path) -> list[BenchRow]:
    """The rows of a ``results.csv`` written by :func:`write_csv`; anything else is a ValueError naming the file."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [name for name in CSV_FIELDS
                       if name not in (reader.fieldnames or []) and name not in OPTIONAL_CSV_FIELDS]
            if missing:
                raise ValueError(f"it has no column(s) {', '.join(missing)}")
            rows = [_row_from_csv(row) for row in reader]
    except (UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"{str(path)!r} is not a `dualcache bench` results.csv: {error}") from None
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as error:
        raise ValueError(f"{str(path)!r} is not a `dualcache bench` results.csv: {error}") from None
    if not rows:
        raise ValueError(f"{str(path)!r} has no result rows")
    return rows


def _row_from_csv(row: dict[str, Any]) -> BenchRow:
    if None in row or any(value is None for value in row.values()):
        raise ValueError(f"row of method {row.get('method')!r} does not have one value per column")
    setting = json.loads(row["setting"])
    if not isinstance(setting, dict):
        raise ValueError(f"the setting of method {row['method']!r} is not a JSON object")
    return BenchRow(
        method=row["method"], budget=_optional_float(row["budget"]), setting=setting,
        flops_ratio=float(row["flops_ratio"]), calibration_ratio=float(row["calibration_ratio"]),
        quality=Quality(psnr=float(row["psnr"]), ssim=float(row["ssim"]), fd=_optional_float(row["fd"]),
                        accuracy=_optional_float(row["accuracy"]),
                        temporal_psnr=_optional_float(row.get("temporal_psnr", ""))),
        pattern=row["pattern"], description=row["description"], family=_family(row["method"]),
    )


def merge_results(paths: Sequence[Path], exclude: Sequence[str] = (), num_images: int = 0, steps: int = 0,
                  model: str = "") -> BenchResult:
    """One result from several benchmark runs on the same images (e.g. learned plans added later).

    Rows measured on other images cannot be compared, so the runs' uncached rows must agree.
    """
    rows: list[BenchRow] = []
    uncached: BenchRow | None = None
    for path in paths:
        for row in read_csv(path):
            if row.method in exclude:
                continue
            if row.method == "uncached" and uncached is not None:
                if row.quality != uncached.quality:
                    raise ValueError(
                        f"{path}: its uncached row ({row.quality}) differs from the first file's ({uncached.quality}); "
                        "only runs on the same images (seeds, conditions, steps) can be merged"
                    )
                continue
            if row.method == "uncached":
                uncached = row
            rows.append(row)
    return BenchResult(rows=rows, skipped={}, num_images=num_images, steps=steps, model=model,
                       has_classifier=any(r.quality.fd is not None for r in rows))


def _fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}{suffix}"


# Below this many images the Frechet distance (64 classifier features, a 64 x 64 covariance) is noise.
MIN_FD_IMAGES = 100


def markdown_table(result: BenchResult) -> str:
    """The results as a markdown document: a header, one table sorted by budget, and skipped methods.

    Clips (video pipelines) get a temporal PSNR column; image results do not have it."""
    temporal = result.has_temporal
    lines = [
        f"# Fidelity at matched compute: {result.model}",
        "",
        (f"{result.counts}. " if result.counts else "")
        + "FLOPs ratio = uncached / method FLOPs of whole "
        "pipeline calls (torch FlopCounterMode), achieved on the evaluation images; `*` = more than 10% "
        "off the budget. PSNR / SSIM against the uncached image of the same seed"
        + (" (for clips: every frame against the same frame; temporal PSNR = PSNR between the consecutive-frame "
           "differences of the clip and those of the uncached clip, i.e. whether it changes from frame to frame "
           "the same way; classifier metrics over all frames)." if temporal else ".")
        + (" FD = Frechet distance to the real test digits in the classifier's features (lower is better);"
           " acc = classifier accuracy against the requested digit." if result.has_classifier else
           " Classifier metrics skipped (no classifier)."),
        "",
        "| budget | method | setting | FLOPs ratio | PSNR dB | SSIM | FD | acc | "
        + ("temporal PSNR dB | " if temporal else "") + "step pattern |",
        "|---|---|---|---|---|---|---|---|" + ("---|" if temporal else "") + "---|",
    ]
    few = result.has_classifier and 0 < result.num_images * max(result.frames, 1) < MIN_FD_IMAGES
    on_clips = result.has_classifier and temporal  # the still-digits classifier on video frames: see the note
    ordered = sorted(result.rows, key=lambda r: (r.budget or 0.0, METHOD_INDEX.get(r.method, 99), r.method))
    for r in ordered:
        budget = "-" if r.budget is None else f"{r.budget:g}x"
        setting = ", ".join(f"{k}={_fmt(v, 3) if isinstance(v, float) else v}" for k, v in r.setting.items()) or "-"
        mark = "" if r.reached else " *"
        fd_nm = " (n/m)" if (few or on_clips) and r.quality.fd is not None else ""
        acc_nm = " (n/m)" if on_clips and r.quality.accuracy is not None else ""
        lines.append(
            f"| {budget} | {r.method} | {setting} | {r.flops_ratio:.2f}x{mark} | {_fmt(r.quality.psnr)} "
            f"| {_fmt(r.quality.ssim, 3)} | {_fmt(r.quality.fd)}{fd_nm} "
            f"| {_fmt(r.quality.accuracy, 3)}{acc_nm} | " + (f"{_fmt(r.quality.temporal_psnr)} | " if temporal else "")
            + f"`{r.pattern}` |"
        )
    if few:
        samples = result.num_images * max(result.frames, 1)
        lines += ["", f"FD (n/m) = not meaningful: computed from only {samples} images; the Frechet distance "
                      f"needs at least {MIN_FD_IMAGES} (the classifier has 64 features) and is only noise here."]
    if on_clips:
        uncached = next((r for r in result.rows if r.method == "uncached"), None)
        seen = (f" (the uncached clips here: FD {_fmt(uncached.quality.fd)}, acc {_fmt(uncached.quality.accuracy, 3)}, "
                "chance is 0.100)" if uncached is not None and uncached.quality.fd is not None else "")
        lines += ["", "FD / acc (n/m) = not meaningful for clips: the digits classifier and the FD reference are "
                      "centred still digits, while a clip's frames show a digit drifting partly out of the frame, "
                      f"so both read the frames only roughly{seen}; see docs/reference_models.md for the video "
                      "model's own quality check. Compare PSNR, SSIM and temporal PSNR instead."]
    lines += ["", STEP_PATTERN_LEGEND + "."]
    if result.skipped:
        lines += ["", "Skipped:", ""] + [f"- {name}: {why}" for name, why in result.skipped.items()]
    lines += [""] + [f"- {note}" for note in result.notes]
    return "\n".join(lines).rstrip() + "\n"


METHOD_INDEX = {name: i for i, name in enumerate(METHOD_ORDER)}


# ours solid, diffusers / cache-dit caches dashed, fewer steps dotted
_LINE_STYLES = {
    "dualcache": {"linestyle": "-", "marker": "o"},
    "plan": {"linestyle": "-", "marker": "*", "markersize": 12},
    "baseline": {"linestyle": "--", "marker": "s"},
    "steps": {"linestyle": ":", "marker": "^"},
    "reference": {"marker": "D"},
}


def plot_speed_quality(result: BenchResult, path: Path) -> None:
    """PSNR (and FD when available) against the achieved FLOPs ratio, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("psnr", "PSNR vs uncached (dB, higher is better)")]
    if result.has_temporal:  # video: the digits are not recognisable, FD says nothing; motion fidelity does
        panels.append(("temporal_psnr", "temporal PSNR vs uncached (dB, frame differences, higher is better)"))
    else:
        panels.append(("fd", "Frechet distance to real digits (lower is better)") if result.has_classifier
                      else ("ssim", "SSIM vs uncached (higher is better)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    names = list(dict.fromkeys(r.method for r in result.rows))
    colors = plt.get_cmap("tab20")
    for ax, (metric, title) in zip(axes[0], panels):
        for i, name in enumerate(names):
            rows = sorted((r for r in result.rows if r.method == name), key=lambda r: r.flops_ratio)
            points = [(r.flops_ratio, getattr(r.quality, metric)) for r in rows]
            points = [(x, y) for x, y in points if y is not None and math.isfinite(y)]
            if points:
                xs, ys = zip(*points)
                style = dict(_LINE_STYLES.get(rows[0].family, {}))
                if name == "duca-budget":  # the default: drawn on top, thicker
                    style.update(linewidth=2.8, zorder=5)
                ax.plot(xs, ys, label=name, color="black" if name == "uncached" else colors(i % 20), **style)
        ax.set_xlabel("FLOPs reduction (x, measured)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{result.model}: {result.counts}" if result.counts else result.model, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(result: BenchResult, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "results.csv", "markdown": out / "results.md", "plot": out / "speed_quality.png"}
    write_csv(result, paths["csv"])
    paths["markdown"].write_text(markdown_table(result))
    plot_speed_quality(result, paths["plot"])
    return paths


def check_plan_steps(plans: dict[str, Path], steps: int) -> None:
    """Fail before any work when a plan file is missing or made for another number of steps."""
    for name, path in plans.items():
        plan = CachePlan.from_json(Path(path))
        if plan.num_steps != steps:
            raise ValueError(f"--plan {name}={path}: the plan is for {plan.num_steps} denoiser calls but --steps is "
                             f"{steps}; pass --steps {plan.num_steps}")
