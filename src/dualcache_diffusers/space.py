"""The Hugging Face Space: the same seeds uncached and cached, side by side, live, with a FLOPs budget to turn.

    dualcache app                          # serves it on http://127.0.0.1:7860 (offline, CPU, shipped models)
    python spaces/dualcache/app.py         # the same, as the Space runs it

:func:`build_app` returns the gradio ``Blocks``; :func:`generate` is the plain function behind it (the app
exposes it as the named API endpoint ``/generate``). Models are the rows of :data:`MODELS` (the shipped
digits DiT and PixArt; :func:`register_model` adds one, e.g. a video pipeline) plus any supported Hub
pipeline id typed in a box (meant for a GPU Space; the ``spaces`` package's ``@spaces.GPU`` is used when
it is installed). Methods: the presets, the bench's knob search calibrated to the budget slider, and the
learned plans of ``docs/results/plans`` (or ``DUALCACHE_PLANS``) that fit the model and step count.

Uncached results are kept in memory per (model, seed, class / prompt, steps, images), so moving the
budget only runs the cached pipeline. Every bad input ends as a :class:`SpaceInputError`, which the page
shows as a message; nothing a user types reaches them as a stack trace.

Heavy packages (torch, diffusers, gradio) are imported inside the functions, so that ``dualcache`` can
import this module to register its subcommand cheaply.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import statistics
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli import register_subcommand

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

logger = logging.getLogger(__name__)

BUDGET_MIN, BUDGET_MAX, BUDGET_DEFAULT = 1.5, 4.0, 2.5
STEPS_MIN, STEPS_MAX = 4, 50
MAX_IMAGES = 4
HUB = "hub"  # the model choice "a Hub pipeline id typed in the box"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]$")


class SpaceInputError(ValueError):
    """Something the user chose or typed cannot be run; the message says what and what is allowed."""


# ------------------------------------------------------------------------------------------------ models


@dataclass(frozen=True)
class ModelSpec:
    """A model the Space offers.

    ``source`` is what :func:`dualcache_diffusers.bench.load_pipeline` takes ("dit", "pixart", a local
    directory or a Hub id). ``conditioning`` is "class" (class id or name) or "text" (a prompt).
    ``load(source, device, dtype)`` and ``generate(pipe, steps, seeds, conditions)`` replace the defaults
    for a model the bench's ``Workload`` cannot drive (e.g. a video pipeline); ``generate`` returns float
    images ``[N, H, W, C]`` or clips ``[N, F, H, W, C]`` in [0, 1] (the Space tiles a clip's frames).
    ``default_condition``, ``steps`` and ``num_images`` are what the page sets when the model is chosen.
    """

    label: str
    source: str
    conditioning: str = "class"
    default_condition: str = "3"
    steps: int = 20
    num_images: int = MAX_IMAGES
    load: Callable[[str, str, str], Any] | None = None
    generate: Callable[[Any, int, list[int], list[Any]], Any] | None = None


MODELS: dict[str, ModelSpec] = {
    "dit": ModelSpec("DiT digits (shipped, class-conditional)", "dit", "class", "3"),
    "pixart": ModelSpec("PixArt-alpha digits (shipped, text-to-image)", "pixart", "text", "a thick seven"),
    # the bench's Workload drives the Latte pipeline too (clips [N, F, H, W, C]); the Space tiles the frames
    "video": ModelSpec("Latte moving digits (shipped, text-to-video)", "video", "text", "a seven moving left",
                       num_images=2),
}


def register_model(key: str, spec: ModelSpec) -> None:
    """Offer another model in the Space (``key`` is the API value, ``spec.label`` what the page shows)."""
    if key == HUB:
        raise ValueError(f"model key {HUB!r} is reserved for Hub ids typed in the box")
    MODELS[key] = spec


def model_choices() -> list[tuple[str, str]]:
    return [(spec.label, key) for key, spec in MODELS.items()] + [("Hub pipeline id (GPU Space)", HUB)]


def _hub_spec(hub_id: str) -> ModelSpec:
    hub_id = (hub_id or "").strip()
    if not hub_id:
        raise SpaceInputError("Type a Hub pipeline id in the 'Hub pipeline id' box, "
                              "e.g. PixArt-alpha/PixArt-XL-2-512x512")
    local = not os.environ.get("SPACE_ID") and Path(hub_id).is_dir()  # local folders only off Hugging Face Spaces
    if not (_HUB_ID.match(hub_id) or local):
        raise SpaceInputError(f"'{hub_id}' is not a Hub id (owner/name)"
                              + ("" if os.environ.get("SPACE_ID") else " nor a local pipeline folder"))
    return ModelSpec(hub_id, hub_id, conditioning="", default_condition="", num_images=1)


def resolve_model(model: str, hub_id: str = "") -> tuple[str, ModelSpec]:
    """(cache key, spec) of a model choice; a SpaceInputError for an unknown one."""
    if model == HUB:
        spec = _hub_spec(hub_id)
        return f"hub:{spec.source}", spec
    if model in MODELS:
        return model, MODELS[model]
    allowed = ", ".join([*MODELS, HUB])
    raise SpaceInputError(f"model '{model}' is not offered here; allowed: {allowed} (for any Hub pipeline choose "
                          f"'{HUB}' and type its id)")


_PIPES: OrderedDict[str, Any] = OrderedDict()
_MAX_HUB_PIPES = 1  # big pipelines: keep only the last one in memory
_LOCK = threading.RLock()  # one generation at a time: the pipelines are shared and the cache hooks live on them


def device_and_dtype(spec: ModelSpec) -> tuple[str, str]:
    """cuda (float16 for Hub models) when there is a GPU, else cpu float32; DUALCACHE_DEVICE overrides."""
    import torch

    device = os.environ.get("DUALCACHE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    shipped = spec.source in ("dit", "pixart")
    return device, ("float16" if device.startswith("cuda") and not shipped else "float32")


def load_model(key: str, spec: ModelSpec) -> Any:
    """The pipeline of a model choice, loaded once; a SpaceInputError saying why it cannot be used."""
    if key in _PIPES:
        _PIPES.move_to_end(key)
        return _PIPES[key]
    device, dtype = device_and_dtype(spec)
    try:
        if spec.load is not None:
            pipe = spec.load(spec.source, device, dtype)
        else:
            from .bench import load_pipeline

            pipe = load_pipeline(spec.source, device, dtype)
    except TypeError as error:  # loaded, but no diffusion transformer
        raise SpaceInputError(f"'{spec.source}' cannot be cached: {error}") from None
    except Exception as error:
        raise SpaceInputError(_load_failure(spec.source, error)) from None
    _check_supported(pipe, spec.source)
    if key.startswith("hub:"):
        for old in [k for k in _PIPES if k.startswith("hub:")][: max(0, len(_PIPES) - _MAX_HUB_PIPES + 1)]:
            del _PIPES[old]
    _PIPES[key] = pipe
    return pipe


def _load_failure(source: str, error: Exception) -> str:
    text = " ".join(str(error).split())
    if len(text) > 300:
        text = text[:300] + " ..."
    offline = any(s in text for s in ("connect", "offline", "not fully cached", "outgoing traffic", "resolve"))
    if offline:
        return (f"Could not download '{source}' from the Hugging Face Hub: there is no network here, or the id does "
                f"not exist. The shipped models (DiT digits, PixArt digits) work offline. ({text})")
    return f"Could not load '{source}': {type(error).__name__}: {text}"


def _check_supported(pipe: Any, source: str) -> None:
    from .api import disable_dual_cache, enable_dual_cache

    try:
        enable_dual_cache(pipe, "fora")
    except (TypeError, ValueError) as error:
        raise SpaceInputError(f"'{source}' ({type(pipe).__name__}) is not supported: {error}") from None
    finally:
        with suppress(TypeError):
            disable_dual_cache(pipe)


def conditioning_of(pipe: Any, spec: ModelSpec) -> str:
    if spec.conditioning:
        return spec.conditioning
    from .bench import is_class_conditional

    return "class" if is_class_conditional(pipe) else "text"


def parse_condition(pipe: Any, spec: ModelSpec, text: str) -> int | str:
    """A class id (from an id or a class name) or a prompt; a SpaceInputError when empty or unknown."""
    text = (text or "").strip()
    if conditioning_of(pipe, spec) == "text":
        if not text:
            raise SpaceInputError("The prompt is empty: type what to draw, e.g. 'a thick seven'")
        return text
    labels: dict[str, int] = dict(getattr(pipe, "labels", None) or {})
    num_classes = len(labels) or int(getattr(pipe.transformer.config, "num_embeds_ada_norm", 1000) or 1000)
    if not text:
        raise SpaceInputError(f"The class is empty: type a class id (0 to {num_classes - 1}) or a class name")
    if re.fullmatch(r"\d+", text):
        if int(text) >= num_classes:
            raise SpaceInputError(f"class {text} is out of range; allowed: 0 to {num_classes - 1}")
        return int(text)
    if text in labels:
        return labels[text]
    examples = ", ".join(sorted(labels, key=labels.get)[:10]) if labels else "this model has no class names"
    raise SpaceInputError(f"'{text}' is not a class of this model; type an id (0 to {num_classes - 1}) or a name "
                          f"({examples})")


# ----------------------------------------------------------------------------------------------- methods


PRESET_LABELS = {"duca": "DuCa preset", "forecast": "Forecasting preset", "fora": "FORA preset",
                 "toca": "ToCa preset"}
CALIBRATED_LABELS = {"duca": "DuCa, calibrated to the budget", "fora": "FORA, calibrated to the budget",
                     "toca": "ToCa, calibrated to the budget"}
DEFAULT_METHOD = "calibrated:duca"


def available_presets() -> list[str]:
    """The presets the installed engine knows (the forecasting preset appears once it exists)."""
    from .config import METHODS

    return [name for name in PRESET_LABELS if name in METHODS]


def plan_dirs() -> list[Path]:
    """Where learned plans are looked for: DUALCACHE_PLANS (os.pathsep-separated), then docs/results/plans
    of a source checkout, then ``plans/`` next to the Space's app.py."""
    dirs = [Path(p) for p in os.environ.get("DUALCACHE_PLANS", "").split(os.pathsep) if p]
    root = Path(__file__).resolve().parents[2]
    dirs += [root / "docs" / "results" / "plans", root / "spaces" / "dualcache" / "plans"]
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


def find_plans() -> dict[str, Path]:
    """Every plan JSON found, by file stem (the first directory wins)."""
    plans: dict[str, Path] = {}
    for directory in plan_dirs():
        for path in sorted(directory.glob("*.json")):
            plans.setdefault(path.stem, path)
    return plans


_PLAN_FITS: dict[tuple[str, str, int], bool] = {}


def plan_fits(pipe: Any, key: str, path: Path, steps: int) -> bool:
    """Whether a plan file fits the pipeline's blocks and modules and the step count (enable_dual_cache checks)."""
    from .api import disable_dual_cache, enable_dual_cache
    from .plan import CachePlan

    cache_key = (key, str(path), steps)
    if cache_key not in _PLAN_FITS:
        try:
            fits = CachePlan.from_json(path).num_steps == steps
            if fits:
                enable_dual_cache(pipe, plan=path)
        except (ValueError, TypeError, OSError, KeyError):
            fits = False
        finally:
            disable_dual_cache(pipe)
        _PLAN_FITS[cache_key] = fits
    return _PLAN_FITS[cache_key]


def method_choices(model: str = "dit", steps: int = 20, hub_id: str = "") -> list[tuple[str, str]]:
    """(label, value) of every method for a model and step count; learned plans only where they fit."""
    choices = [(CALIBRATED_LABELS[name], f"calibrated:{name}") for name in CALIBRATED_LABELS]
    choices += [(PRESET_LABELS[name], name) for name in available_presets()]
    with _LOCK:  # plan_fits hooks the shared pipeline for a moment
        try:
            key, spec = resolve_model(model, hub_id)
            pipe = _PIPES.get(key) if model == HUB else load_model(key, spec)  # Hub models: only once loaded
        except SpaceInputError:
            pipe = None
        if pipe is not None:
            for name, path in find_plans().items():
                if plan_fits(pipe, key, path, steps):
                    choices.append((f"Learned plan {name} ({steps} steps)", f"plan:{name}"))
    return choices


# ------------------------------------------------------------------------------------------- generation


@dataclass
class Reference:
    """The uncached generation of one (model, seeds, condition, steps), kept in memory."""

    images: np.ndarray
    flops: int
    seconds: float
    runs: int


@dataclass
class SpaceResult:
    """What :func:`generate` returns: the three pictures, the plan heatmap, the table and the numbers."""

    uncached: Image.Image
    cached: Image.Image
    difference: Image.Image
    plan: Image.Image | None
    table: str
    status: str
    numbers: dict[str, Any] = field(default_factory=dict)


_REFERENCES: OrderedDict[tuple, Reference] = OrderedDict()
_CALIBRATIONS: dict[tuple, tuple[dict[str, Any], float]] = {}
_MAX_REFERENCES = 64


def check_budget(budget: float) -> float:
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise SpaceInputError(f"budget={budget!r} is not a number; allowed: {BUDGET_MIN} to {BUDGET_MAX}") from None
    if not math.isfinite(value) or not BUDGET_MIN <= value <= BUDGET_MAX:
        raise SpaceInputError(f"budget={budget!r} is out of range; allowed: {BUDGET_MIN} to {BUDGET_MAX} "
                              "(times fewer FLOPs than uncached)")
    return value


def _integer(name: str, value: Any, low: int, high: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SpaceInputError(f"{name}={value!r} is not a number") from None
    if not number.is_integer() or not low <= number <= high:
        raise SpaceInputError(f"{name}={value!r} is out of range; allowed: whole numbers {low} to {high}")
    return int(number)


def generate(
    model: str = "dit",
    method: str = DEFAULT_METHOD,
    budget: float = BUDGET_DEFAULT,
    seed: int = 0,
    condition: str | None = None,
    steps: int = 20,
    num_images: int = MAX_IMAGES,
    hub_id: str = "",
    progress: Callable[[float, str], None] | None = None,
) -> SpaceResult:
    """Generate ``num_images`` seeds (``seed``, ``seed + 1``, ...) uncached and with ``method``, and compare.

    ``method`` is a preset ("duca", "fora", "toca"), "calibrated:NAME" (NAME's knob searched by the bench's
    :class:`~dualcache_diffusers.bench.Calibrator` so that the measured FLOPs ratio is nearest ``budget``)
    or "plan:NAME" (a learned plan found by :func:`find_plans`). ``condition`` is a class id or name, or a
    prompt; None means the model's default (an empty one is an error, as in the page). Bad input raises
    :class:`SpaceInputError` before any generation.
    """
    report = progress or (lambda fraction, text: None)
    budget = check_budget(budget)
    steps = _integer("steps", steps, STEPS_MIN, STEPS_MAX)
    num_images = _integer("images", num_images, 1, MAX_IMAGES)
    seed = _integer("seed", seed, 0, 2**31 - 1)
    key, spec = resolve_model(model, hub_id)
    _check_method_name(method)
    with _LOCK:
        report(0.02, f"loading {spec.label}")
        pipe = load_model(key, spec)
        chosen = parse_condition(pipe, spec, spec.default_condition if condition is None else condition)
        plan_path = _plan_path(method, pipe, key, steps)
        seeds = [seed + i for i in range(num_images)]
        with _threads_for(pipe):
            return _compare(pipe, key, spec, method, budget, steps, seeds, chosen, plan_path, report)


def _check_method_name(method: str) -> None:
    kind, _, name = str(method).partition(":")
    ok = (method in available_presets()) or (kind == "calibrated" and name in CALIBRATED_LABELS) or (
        kind == "plan" and bool(name))
    if not ok:
        allowed = [*available_presets(), *(f"calibrated:{n}" for n in CALIBRATED_LABELS), "plan:NAME"]
        raise SpaceInputError(f"method '{method}' is not offered; allowed: {', '.join(allowed)}")


def _plan_path(method: str, pipe: Any, key: str, steps: int) -> Path | None:
    if not method.startswith("plan:"):
        return None
    name = method.partition(":")[2]
    plans = find_plans()
    if name not in plans:
        raise SpaceInputError(f"no learned plan named '{name}'; found: {', '.join(plans) or 'none'} "
                              f"(in {', '.join(map(str, plan_dirs())) or 'no plan folder'})")
    if not plan_fits(pipe, key, plans[name], steps):
        raise SpaceInputError(f"the learned plan '{name}' does not fit this model at {steps} steps (it was trained "
                              "for another model or step count); pick a method from the list")
    return plans[name]


@contextmanager
def _threads_for(pipe: Any):
    """Tiny models on CPU run faster on one thread (as in the CLI); restored afterwards."""
    import torch

    device = getattr(pipe, "device", None)
    small = sum(p.numel() for p in pipe.transformer.parameters()) < 20_000_000
    before = torch.get_num_threads()
    if small and getattr(device, "type", "cpu") == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _workload(pipe: Any, spec: ModelSpec, steps: int, seeds: list[int], condition: Any):
    from .bench import Workload

    workload = Workload(pipe, steps, seeds, [condition] * len(seeds), paired=True, batch_size=len(seeds))
    if spec.generate is not None:
        workload.generate = lambda steps=None: spec.generate(pipe, steps or workload.steps, seeds,
                                                             [condition] * len(seeds))
    return workload


def _timed(run: Callable[[], Any], device: Any, budget_s: float = 2.0, max_runs: int = 3) -> tuple[float, int]:
    """Median wall time of ``run``: once, and up to ``max_runs`` times when a run is short."""
    import torch

    sync = torch.cuda.synchronize if getattr(device, "type", "cpu") == "cuda" else (lambda: None)
    times: list[float] = []
    while len(times) < max_runs and (not times or sum(times) < budget_s):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(times)


RETIME_UNCACHED_S = 1.0  # uncached calls shorter than this are timed again with every cached one


def _timed_interleaved(run: Callable[[], Any], apply: Callable[[], None], undo: Callable[[], None], device: Any,
                       budget_s: float = 3.0, max_rounds: int = 3) -> tuple[float, float, int]:
    """Median uncached and cached wall times of ``run``, alternating (cached first: it is applied on entry)."""
    cached: list[float] = []
    uncached: list[float] = []
    start = time.perf_counter()
    while len(cached) < max_rounds and (not cached or time.perf_counter() - start < budget_s):
        cached.append(_timed(run, device, max_runs=1)[0])
        undo()
        uncached.append(_timed(run, device, max_runs=1)[0])
        apply()
    return statistics.median(uncached), statistics.median(cached), len(cached)


def _reference(pipe: Any, key: str, workload: Any, condition: Any, report: Callable[[float, str], None]):
    from .api import disable_dual_cache
    from .stats import count_flops

    ref_key = (key, tuple(workload.seeds), str(condition), workload.steps)
    if ref_key in _REFERENCES:
        _REFERENCES.move_to_end(ref_key)
        return _REFERENCES[ref_key], True
    disable_dual_cache(pipe)
    report(0.1, "uncached: generating (FLOPs counted)")
    with count_flops() as counter:
        images = workload.generate()
    report(0.25, "uncached: timing")
    seconds, runs = _timed(workload.generate, getattr(pipe, "device", None))
    reference = Reference(images, counter.get_total_flops(), seconds, runs)
    _REFERENCES[ref_key] = reference
    while len(_REFERENCES) > _MAX_REFERENCES:
        _REFERENCES.popitem(last=False)
    return reference, False


def _calibrate(pipe: Any, key: str, workload: Any, name: str, budget: float, report) -> tuple[dict[str, Any], float]:
    from .bench import Calibrator

    cal_key = (key, workload.steps, len(workload.seeds), name, round(budget, 3))
    if cal_key not in _CALIBRATIONS:
        report(0.4, f"calibrating {name} to {budget:g}x fewer FLOPs (knob search)")
        method = _bench_methods(workload.steps)[name]
        _CALIBRATIONS[cal_key] = Calibrator(workload).search(method, budget)
    return _CALIBRATIONS[cal_key]


_METHODS_BY_STEPS: dict[int, dict[str, Any]] = {}


def _bench_methods(steps: int) -> dict[str, Any]:
    from .bench import build_methods

    if steps not in _METHODS_BY_STEPS:
        bench_logger = logging.getLogger("dualcache_diffusers.bench")
        level = bench_logger.level
        bench_logger.setLevel(logging.ERROR)  # its warnings about baselines the Space does not offer
        try:
            _METHODS_BY_STEPS[steps] = build_methods(steps)
        finally:
            bench_logger.setLevel(level)
    return _METHODS_BY_STEPS[steps]


def _compare(pipe, key, spec, method, budget, steps, seeds, condition, plan_path, report) -> SpaceResult:
    from . import metrics
    from .api import cache_stats, disable_dual_cache, enable_dual_cache
    from .stats import count_flops

    workload = _workload(pipe, spec, steps, seeds, condition)
    reference, reused = _reference(pipe, key, workload, condition, report)
    setting: dict[str, Any] = {}
    calibrated_ratio = None
    kind, _, name = method.partition(":")
    if kind == "calibrated":
        setting, calibrated_ratio = _calibrate(pipe, key, workload, name, budget, report)

    def apply() -> None:
        if kind == "calibrated":
            _bench_methods(steps)[name].apply(workload, setting)
        elif kind == "plan":
            enable_dual_cache(pipe, plan=plan_path)
        else:
            enable_dual_cache(pipe, method)

    device = getattr(pipe, "device", None)
    try:
        apply()
        report(0.7, "cached: generating (FLOPs counted)")
        with count_flops() as counter:
            images = workload.generate()
        stats = cache_stats(pipe)
        plan = _engine_plan(pipe, steps, plan_path)
        report(0.8, "timing")
        if reference.seconds <= RETIME_UNCACHED_S:  # cheap: time both again, interleaved, in this request
            uncached_s, seconds, runs = _timed_interleaved(workload.generate, apply, lambda: disable_dual_cache(pipe),
                                                           device)
            time_memo = False
        else:  # expensive: the uncached time measured with the first request
            uncached_s, time_memo = reference.seconds, True
            seconds, runs = _timed(workload.generate, device)
    finally:
        disable_dual_cache(pipe)
    report(0.9, "scoring")
    flops = counter.get_total_flops()
    quality = metrics.fidelity(images, reference.images)  # clips: over every frame
    psnr, ssim = quality["psnr"], quality["ssim"]
    pattern = "".join(k[0].upper() for k in stats.step_kinds)
    numbers = {
        "model": spec.source, "method": method, "budget": budget, "setting": setting,
        "calibration_ratio": calibrated_ratio, "steps": steps, "seeds": seeds, "condition": condition,
        "uncached_seconds": uncached_s, "cached_seconds": seconds,
        "wall_speedup": uncached_s / seconds if seconds > 0 else float("nan"),
        "uncached_flops": reference.flops, "cached_flops": flops,
        "flops_ratio": reference.flops / max(flops, 1), "denoiser_flops_ratio": stats.flops_speedup,
        "psnr": psnr, "ssim": ssim, "cache_bytes": stats.cache_bytes, "pattern": pattern,
        "uncached_images_from_memory": reused, "uncached_time_from_memory": time_memo, "timing_runs": runs,
    }
    label = _method_label(method)
    result = SpaceResult(
        uncached=to_grid(reference.images),
        cached=to_grid(images),
        difference=difference_map(images, reference.images),
        plan=plan_heatmap(plan, "plan: fraction of each module computed") if plan is not None else None,
        table=results_table(numbers, label),
        status=_status(spec, numbers, label),
        numbers=numbers,
    )
    report(1.0, "done")
    return result


def _method_label(method: str) -> str:
    kind, _, name = method.partition(":")
    if kind == "calibrated":
        return CALIBRATED_LABELS.get(name, method)
    if kind == "plan":
        return f"learned plan {name}"
    return PRESET_LABELS.get(method, method)


def _engine_plan(pipe: Any, steps: int, plan_path: Path | None):
    """The plan the engine ran (for the heatmap), or None where the engine cannot tell it."""
    from .api import get_engine
    from .plan import CachePlan

    if plan_path is not None:
        return CachePlan.from_json(plan_path)
    engine = get_engine(pipe)
    try:
        return engine.denoisers[0].plan(steps) if engine is not None else None
    except Exception:  # engine internals are not public API: no heatmap rather than no result
        logger.warning("could not read the engine's plan for the heatmap", exc_info=True)
        return None


def _fmt_flops(flops: float) -> str:
    return f"{flops / 1e12:.2f} TFLOPs" if flops >= 1e12 else f"{flops / 1e9:.2f} GFLOPs"


def results_table(n: dict[str, Any], label: str) -> str:
    """The markdown table the page shows."""
    psnr = "inf (identical)" if math.isinf(n["psnr"]) else f"{n['psnr']:.2f}"
    setting = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in n["setting"].items())
    if n["calibration_ratio"] is not None:
        setting = f"{setting or 'preset'} (knob search for {n['budget']:g}x: {n['calibration_ratio']:.2f}x)"
    memo = " (measured with the first request)" if n["uncached_time_from_memory"] else ""
    rows = [
        ("method", f"{label}" + (f": {setting}" if setting else "")),
        ("step pattern", f"`{n['pattern']}`"),
        ("wall time uncached", f"{n['uncached_seconds']:.3f} s{memo}"),
        ("wall time cached", f"{n['cached_seconds']:.3f} s"),
        ("wall speedup", f"{n['wall_speedup']:.2f}x"),
        ("FLOPs uncached", _fmt_flops(n["uncached_flops"])),
        ("FLOPs cached", _fmt_flops(n["cached_flops"])),
        ("FLOPs ratio", f"{n['flops_ratio']:.2f}x"),
        ("PSNR", f"{psnr} dB"),
        ("SSIM", f"{n['ssim']:.4f}"),
        ("cache memory", f"{n['cache_bytes'] / 2**20:.2f} MiB"),
    ]
    lines = ["| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    note = ("Steps: F full, C partial (some tokens), A aggressive (reuse), L learned. FLOPs: torch FlopCounterMode "
            "around whole pipeline calls. Wall time: median of up to 3 runs (short calls: uncached and cached "
            "interleaved). PSNR / SSIM: cached vs uncached images "
            "of the same seeds.")
    return "\n".join(lines) + "\n\n" + note


def _status(spec: ModelSpec, n: dict[str, Any], label: str) -> str:
    images, cond = len(n["seeds"]), n["condition"]
    what = f"class {cond}" if isinstance(cond, int) else f"'{cond}'"
    return (f"{spec.label}, {what}: {images} image{'s' if images > 1 else ''} (seeds {n['seeds'][0]}.."
            f"{n['seeds'][-1]}), "
            f"{n['steps']} steps, {label}: **{n['flops_ratio']:.2f}x fewer FLOPs**, {n['wall_speedup']:.2f}x "
            f"faster, PSNR {n['psnr']:.2f} dB.")


# ---------------------------------------------------------------------------------------------- pictures


def _frames(images: Any) -> np.ndarray:
    """[N, H, W, C] float in [0, 1]; a clip batch [N, F, H, W, C] becomes one strip of frames per sample."""
    import numpy as np

    array = np.asarray(images, dtype=np.float32)
    if array.ndim == 5:  # clips: up to 8 frames side by side
        n, f, h, _, c = array.shape
        picked = array[:, np.linspace(0, f - 1, min(f, 8)).round().astype(int)]
        array = picked.transpose(0, 2, 1, 3, 4).reshape(n, h, -1, c)
    if array.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C] or clips [N, F, H, W, C], got shape {array.shape}")
    return np.clip(array, 0.0, 1.0)


def to_grid(images: Any, min_side: int = 128, pad: int = 2) -> Image.Image:
    """Images in a grid of up to 2 columns, scaled up (nearest) so that a cell is at least ``min_side`` px."""
    import numpy as np
    from PIL import Image

    array = _frames(images)
    n, h, w, _ = array.shape
    cols = 1 if n == 1 else 2
    rows = math.ceil(n / cols)
    scale = max(1, math.ceil(min_side / max(h, w)) if max(h, w) < min_side else 1)
    cell_h, cell_w = h * scale, w * scale
    grid = Image.new("RGB", (cols * cell_w + (cols + 1) * pad, rows * cell_h + (rows + 1) * pad), (255, 255, 255))
    for i, image in enumerate(array):
        tile = Image.fromarray((image * 255).round().astype(np.uint8).squeeze())
        tile = tile.convert("RGB").resize((cell_w, cell_h), Image.NEAREST)
        grid.paste(tile, (pad + (i % cols) * (cell_w + pad), pad + (i // cols) * (cell_h + pad)))
    return grid


DIFF_GAIN = 4.0


def difference_map(images: Any, reference: Any, gain: float = DIFF_GAIN) -> Image.Image:
    """|cached - uncached| (mean over channels) x ``gain``, in the inferno colour map, laid out like the grid."""
    import numpy as np
    from matplotlib import colormaps

    a, b = _frames(images), _frames(reference)
    diff = np.clip(np.abs(a - b).mean(axis=-1) * gain, 0.0, 1.0)
    return to_grid(colormaps["inferno"](diff)[..., :3])


def plan_heatmap(plan: Any, title: str) -> Image.Image:
    """The plan's steps x blocks heatmap (one panel per module), as drawn by ``dualcache plan``."""
    from PIL import Image

    from .l2c.plot import plot_plan

    with tempfile.TemporaryDirectory() as tmp:
        path = plot_plan(plan, Path(tmp) / "plan.png", title=title)
        with Image.open(path) as image:
            return image.convert("RGB")


# --------------------------------------------------------------------------------------------------- app


def _gpu(fn: Callable) -> Callable:
    """``spaces.GPU`` when the ``spaces`` package is installed (a ZeroGPU Space), else the function itself."""
    try:
        import spaces  # type: ignore[import-not-found]
    except ImportError:
        return fn
    gpu = getattr(spaces, "GPU", None)  # not the package: e.g. this repo's spaces/ folder seen as a namespace
    return gpu(duration=120)(fn) if callable(gpu) else fn


INTRO = """# dualcache-diffusers: feature caching, live
The same seeds **uncached** and **cached** side by side, with the wall time, the FLOPs (counted by
`torch.utils.flop_counter.FlopCounterMode`), the fidelity (PSNR / SSIM against the uncached images) and the
cache's memory. *Calibrated to the budget* searches the method's knob (interval, fresh-token ratio) so that
the measured FLOPs ratio lands near the budget slider. The uncached images are kept in memory, so moving the
slider only reruns the cached pipeline. Runs offline on CPU with the shipped digits models; on a GPU Space
type any supported Hub pipeline id (DiT, PixArt-alpha / -Sigma)."""


def build_app() -> Any:
    """The gradio Blocks of the Space (``.launch()`` it, or see :func:`launch`)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    @_gpu
    def run(model, hub_id, method, budget, seed, condition, steps, num_images, progress=gr.Progress()):  # noqa: B008
        try:
            result = generate(model=model, method=method, budget=budget, seed=seed, condition=condition,
                              steps=steps, num_images=num_images, hub_id=hub_id,
                              progress=lambda fraction, text: progress(fraction, desc=text))
        except SpaceInputError as error:
            raise gr.Error(str(error), duration=None, print_exception=False) from None
        except Exception as error:  # keep serving; the page gets a message, the log the traceback
            logger.exception("generation failed")
            raise gr.Error(f"Generation failed: {type(error).__name__}: {error}", duration=None,
                           print_exception=False) from None
        return result.uncached, result.cached, result.difference, result.table, result.plan, result.status

    def on_model(model, hub_id, condition):
        spec = MODELS.get(model)
        if spec is not None:
            label = "Class (id or name)" if spec.conditioning == "class" else "Prompt"
            cond = gr.update(label=label, value=spec.default_condition)
        else:  # a Hub pipeline: class or prompt as the pipeline takes; one image by default (big models)
            spec = ModelSpec("", "", steps=20, num_images=1)
            cond = gr.update(label="Class (id or name) or prompt, as the pipeline takes", value=condition)
        return (gr.update(visible=model == HUB), cond,
                gr.update(choices=method_choices(model, spec.steps, hub_id), value=DEFAULT_METHOD),
                gr.update(value=spec.steps), gr.update(value=spec.num_images))

    def on_steps(model, hub_id, steps, method):
        choices = method_choices(model, steps, hub_id)
        return gr.update(choices=choices, value=method if method in [v for _, v in choices] else DEFAULT_METHOD)

    with gr.Blocks(title="dualcache-diffusers: feature caching, live") as app:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                model = gr.Dropdown(model_choices(), value="dit", label="Model", elem_id="model")
                hub_id = gr.Textbox(label="Hub pipeline id", placeholder="PixArt-alpha/PixArt-XL-2-512x512",
                                    visible=False, elem_id="hub_id")
                method = gr.Dropdown(method_choices("dit", 20), value=DEFAULT_METHOD, label="Method",
                                     elem_id="method")
                budget = gr.Slider(BUDGET_MIN, BUDGET_MAX, value=BUDGET_DEFAULT, step=0.1,
                                   label="FLOPs budget (x fewer FLOPs; used by 'calibrated to the budget')",
                                   elem_id="budget")
                condition = gr.Textbox(label="Class (id or name)", value=MODELS["dit"].default_condition,
                                       elem_id="condition")
                seed = gr.Number(value=0, precision=0, label="Seed (image i uses seed + i)", elem_id="seed")
                with gr.Accordion("Steps and images", open=False):
                    steps = gr.Slider(STEPS_MIN, STEPS_MAX, value=20, step=1, label="Denoising steps",
                                      elem_id="steps")
                    num_images = gr.Slider(1, MAX_IMAGES, value=MAX_IMAGES, step=1, label="Images",
                                           elem_id="num_images")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=2):
                with gr.Row():
                    uncached = gr.Image(label="uncached", type="pil", format="png", elem_id="uncached")
                    cached = gr.Image(label="cached", type="pil", format="png", elem_id="cached")
                    difference = gr.Image(label=f"|cached - uncached| x {DIFF_GAIN:g}", type="pil", format="png",
                                          elem_id="difference")
                with gr.Row():
                    with gr.Column(scale=3):
                        table = gr.Markdown(elem_id="results")
                    with gr.Column(scale=2):
                        plan = gr.Image(label="plan", show_label=False, type="pil", format="png", elem_id="plan")
        model.change(on_model, [model, hub_id, condition], [hub_id, condition, method, steps, num_images],
                     api_visibility="private")
        steps.change(on_steps, [model, hub_id, steps, method], [method], api_visibility="private")
        hub_id.submit(on_steps, [model, hub_id, steps, method], [method], api_visibility="private")
        button.click(run, [model, hub_id, method, budget, seed, condition, steps, num_images],
                     [uncached, cached, difference, table, plan, status], api_name="generate")
    return app


CSS = """
#results table { font-size: 0.92em; }
#results td, #results th { padding: 3px 10px !important; }
#results td:first-child, #results th:first-child { white-space: nowrap; }
"""


def launch(host: str | None = None, port: int | None = None, share: bool = False, **kwargs: Any) -> Any:
    """Build and launch the app; returns the Blocks (``prevent_thread_lock=True`` to get it back at once).

    host / port default to GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, else 127.0.0.1:7860; other keywords go to
    ``Blocks.launch``.
    """
    host = host or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    port = int(port or os.environ.get("GRADIO_SERVER_PORT") or 7860)
    app = build_app()
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, share=share, ssr_mode=False, css=CSS, **kwargs)
    return app


# ---------------------------------------------------------------------------------------------- command


def _configure_app(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None,
                        help="address to serve on (default: $GRADIO_SERVER_NAME or 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs network)")


def _run_app(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ImportError("the app needs gradio: pip install 'dualcache-diffusers[demo]'") from None
    launch(args.host, args.port, share=args.share)
    return 0


register_subcommand("app", "the Space locally: uncached vs cached side by side in the browser, with a FLOPs budget",
                    _configure_app, _run_app)


__all__ = ["MODELS", "ModelSpec", "SpaceInputError", "SpaceResult", "build_app", "generate", "launch",
           "method_choices", "register_model"]

