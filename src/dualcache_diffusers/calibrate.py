"""Calibration: search a budget schedule on a few images of the model itself and write it as a plan.

``dualcache calibrate --model DIR --budget 3 --out plan.json`` (or :func:`calibrate` from Python):

1. generate the calibration images uncached (the reference) and once with the default budget rule,
   which also records the model's FLOPs per step (the engine's own count);
2. search the knobs of :class:`~.budget.Schedule` (number of full steps, leading full steps, how the
   rest are spread, whether they gather at both ends of the run and how many forecast steps follow
   the last, forecast order, how the recomputed
   tokens are spread over steps and layers and how many go to the first gap,
   whether the other steps skip the block stack), one knob at a time from the default rule (a knob that
   moves the grid together with each tail); every
   candidate gets the fresh ratio that brings its FLOPs to the budget's (never above them) and is
   scored by PSNR against the reference; it replaces the best plan so far only where its gain, paired
   image by image, is significant (:func:`significantly_better`);
3. (hook) fit learned forecast weights for the best plan where the library provides them (kept on the
   same test);
4. return the best plan; its metadata records the budget, the predicted FLOPs ratio, the scores
   and the search.

Calibrating on 20 images takes 10 s to 2 min on one CPU core for the shipped models (33 s for the DiT at budget 3,
27 s at budget 2); candidates that give a plan already scored are not generated again. The seeds should differ
from the ones a plan is evaluated on (``dualcache bench`` does so).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .budget import (
    CostModel,
    Schedule,
    affordable_full_steps,
    check_budget,
    fit_ratio,
    short_tail,
)
from .plan import CachePlan

logger = logging.getLogger(__name__)

#: the values tried for each knob (coordinate search from the default rule, in this order)
SEARCH_SPACE: dict[str, Sequence[Any]] = {
    "full_steps": (0, -1, -2, 1),  # offsets from the most full steps the budget affords
    # leading full steps before the spacing: the search moves one knob at a time, so its order matters, and a rough
    # start is what the default rule cannot see (docs/methods.md). On the shipped DiT at 2x, spacing first (warp 1.5)
    # left two leading steps no significant gain; from the even grid they gain 2 dB (calibration images, 2026-11-24).
    "warmup": (1, 2, 3, 4),
    "warp": (1.0, 1.5, 2.0, 2.5),
    "ends": (0.0, 0.3, 0.6),  # full steps denser at both ends of the run
    "tail": (None, 0, 1, 2),  # forecast steps after the last full step (None: the even grid's)
    "short_first": (True, False),  # the grid's first gap its shortest
    "order": (1, 2),
    "ratio_schedule": ("constant", "pixart"),
    "first_gap_weight": (1.0, 10.0, 100.0),  # tokens of the first gap (order 0) against the rest's
    "skip": (False, True),
}
#: passes of the coordinate search at most (it stops after a pass that changed nothing)
SEARCH_PASSES = 2
#: knobs that move the grid of full steps: each value is tried with the rule's tail for the new grid (principle 2
#: of :mod:`.budget`), as the default rule would, and with every explicit ``tail``: where the last full step falls
#: depends on the grid, so a search moving one knob at a time could not reach a better grid that needs another tail
GRID_KNOBS = ("full_steps", "warmup", "warp")
#: standard errors by which a candidate's mean PSNR gain over the best plan so far, paired image by image, must
#: exceed zero for it to replace that plan (the one-standard-error rule of model selection). Picking the best of
#: ~30 candidates on 20 images by the mean alone picks plans that fit those images: twice the benchmark's calibrated
#: plan scored 0.2 / 0.6 dB below the default rule's on the evaluation images after beating it on the calibration
#: images by 0.06 / 0.09 dB (0.22 / 0.15 standard errors). Two standard errors also turned away gains that held.
SIGNIFICANCE = 1.0


@dataclass
class Candidate:
    schedule: Schedule
    plan: CachePlan
    scores: np.ndarray  # PSNR (dB) per calibration image
    ratio: float  # predicted FLOPs reduction (engine accounting)

    @property
    def psnr(self) -> float:
        return float(self.scores.mean())


def default_run(pipe: Any, workload: Any, budget: float) -> tuple[CostModel, CachePlan, Any]:
    """One generation of the workload with the default budget rule: the cost model the engine built its plan from
    (the FLOPs per step it recorded, knowing a joint block's text rows), that plan, and the images."""
    from .api import disable_dual_cache, enable_dual_cache, get_engine

    enable_dual_cache(pipe, budget=budget)
    try:
        images = workload.generate()
        den = get_engine(pipe).denoisers[0]
        key, cost = next(iter(den.cost_models.items()))
        return cost, den.plans[key], images
    finally:
        disable_dual_cache(pipe)


def cost_model(pipe: Any, workload: Any, budget: float) -> tuple[CostModel, Any]:
    """The cost model and images of :func:`default_run`."""
    cost, _, images = default_run(pipe, workload, budget)
    return cost, images


def score_plan(pipe: Any, workload: Any, plan: CachePlan, reference: np.ndarray) -> np.ndarray:
    """PSNR (dB) per image of the workload generated with ``plan`` against ``reference``."""
    from .api import disable_dual_cache, enable_dual_cache

    enable_dual_cache(pipe, plan=plan)
    try:
        images = workload.generate()
    finally:
        disable_dual_cache(pipe)
    return image_scores(images, reference)


def image_scores(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """PSNR (dB) per image (per clip: the mean over its frames), identical images counting as the metrics' cap and
    an image holding NaN as -inf (a broken plan loses every comparison)."""
    from . import metrics

    if np.asarray(images).ndim == 5:  # clips [N, F, H, W, C]: frame PSNRs, averaged per clip
        scores = np.minimum(metrics.frame_psnr(images, reference), metrics.PSNR_CAP_DB).mean(axis=1)
    else:
        scores = np.minimum(metrics.psnr(images, reference), metrics.PSNR_CAP_DB)
    return np.where(np.isnan(scores), -np.inf, scores)


def gain_z(scores: np.ndarray, best: np.ndarray) -> float:
    """The mean PSNR gain of ``scores`` over ``best`` (per image, the same images) in standard errors of that mean
    (a paired test: the images' own difficulty cancels out); +-inf where every image gains or loses the same."""
    gain = np.asarray(scores, dtype=np.float64) - np.asarray(best, dtype=np.float64)
    if np.isnan(gain).any():  # both broken on some image (-inf - -inf): no evidence of a gain
        return -math.inf
    mean = gain.mean() if gain.size else 0.0
    spread = gain.std(ddof=1) / np.sqrt(gain.size) if gain.size > 1 else 0.0
    if spread > 0:
        return float(mean / spread)
    return 0.0 if mean == 0 else math.copysign(math.inf, mean)


def significantly_better(scores: np.ndarray, best: np.ndarray, z: float = SIGNIFICANCE) -> bool:
    """Whether ``scores`` beat ``best`` (PSNR per image, the same images) by a mean gain of more than ``z`` standard
    errors (:func:`gain_z`)."""
    return gain_z(scores, best) > z


def _candidate(schedule: Schedule, knob: str, value: Any, steps: int) -> Schedule:
    """``schedule`` with ``knob`` set to ``value``; a knob that moves the grid brings the rule's tail for it."""
    moved = replace(schedule, **{knob: value}, fresh_ratio=None)
    if knob in GRID_KNOBS:
        moved = replace(moved, tail=short_tail(steps, moved.full_steps, moved.warmup, moved.warp))
    return moved


def _knob_values(space: dict[str, Sequence[Any]], k0: int, steps: int) -> Iterator[tuple[str, Any]]:
    """Each (knob, value) of one pass, in order; ``full_steps`` offsets become step counts around ``k0``."""
    for knob, values in space.items():
        for value in values:
            yield knob, (max(1, min(steps, k0 + int(value))) if knob == "full_steps" else value)


def _candidates(schedule: Schedule, knob: str, value: Any, steps: int, tails: Sequence[int | None]) -> list[Schedule]:
    """The schedules to try for ``knob = value``: :func:`_candidate`, and for a knob that moves the grid the same
    grid with each explicit tail too (:data:`GRID_KNOBS`)."""
    moved = _candidate(schedule, knob, value, steps)
    if knob not in GRID_KNOBS:
        return [moved]
    return [moved] + [replace(moved, tail=tail) for tail in tails if tail is not None and tail != moved.tail]


def calibrate(pipe: Any, workload: Any, budget: float, progress: Any = None,
              space: dict[str, Sequence[Any]] | None = None, significance: float = SIGNIFICANCE) -> CachePlan:
    """The best budget schedule found for ``pipe`` on ``workload`` (a :class:`bench.Workload`); a candidate replaces
    the best so far where its paired gain exceeds ``significance`` standard errors (:data:`SIGNIFICANCE`)."""
    budget = check_budget(budget)
    space = dict(SEARCH_SPACE if space is None else space)
    progress = progress or _NoProgress()
    steps = workload.steps
    reference = workload.generate()
    cost, default, default_images = default_run(pipe, workload, budget)
    from .adapters import find_adapter

    layout = find_adapter(pipe.transformer).layout(pipe.transformer)
    progress.update(1)
    k0 = affordable_full_steps(steps, budget, cost, layout)
    schedule = replace(Schedule(**default.metadata["schedule"]), fresh_ratio=None)  # skip=True where it had to
    best = Candidate(schedule, default, image_scores(default_images, reference), cost.ratio(default))
    tried = {best.schedule}
    scored = {_plan_key(default)}  # knob values that give a plan already scored are not generated again
    log = [{"schedule": best.schedule.describe(), "psnr": round(best.psnr, 3), "rule": "default"}]
    for _ in range(SEARCH_PASSES):  # coordinate search; a knob's best value can change once another moved
        start = best.schedule
        for knob, value in _knob_values(space, k0, steps):
            for schedule in _candidates(best.schedule, knob, value, steps, space.get("tail", ())):
                if schedule in tried:
                    continue
                tried.add(schedule)
                fitted = fit_ratio(steps, layout, schedule, budget, cost)
                progress.update(1)
                if fitted is None or _plan_key(fitted[0]) in scored:
                    continue
                plan = fitted[0]
                scored.add(_plan_key(plan))
                scores = score_plan(pipe, workload, plan, reference)
                z = gain_z(scores, best.scores)
                taken = z > significance
                log.append({"schedule": schedule.describe(), "psnr": round(float(scores.mean()), 3),
                            "gain_z": round(z, 2), "taken": taken})
                if taken:
                    best = Candidate(schedule, plan, scores, cost.ratio(plan))
                progress.set_postfix_str(f"best {best.psnr:.2f} dB")
        if best.schedule == start:
            break
    plan = _with_learned_forecast(pipe, workload, best, reference)
    plan.metadata.update({
        "calibration": {
            "budget": budget, "predicted_flops_ratio": round(best.ratio, 4), "psnr": round(best.psnr, 3),
            "default_rule_psnr": log[0]["psnr"], "seeds": list(workload.seeds), "images": len(workload),
            "schedule": dataclasses.asdict(best.schedule), "search": log,
        },
        "num_inference_steps": steps,
    })
    plan.method = "duca-calibrated"
    return plan


def _plan_key(plan: CachePlan) -> tuple:
    """What makes two plans run the same: every step's kind, fractions, stack skipping, forecast and cycle length."""
    return tuple((step.kind, tuple(map(tuple, step.fractions)), step.skip_blocks, step.skip_call, step.forecast_order,
                  step.forecast_weights, step.interval) for step in plan.steps)


def _with_learned_forecast(pipe: Any, workload: Any, best: Candidate, reference: np.ndarray) -> CachePlan:
    """The best plan with learned forecast weights (ridge regression on the calibration trajectories,
    :func:`.forecast_fit.fit_forecast_weights`), kept if it scores better on the calibration images."""
    from .forecast_fit import fit_forecast_weights

    try:
        learned = fit_forecast_weights(pipe, best.plan, list(workload.seeds), list(workload.conditions),
                                       guidance_scale=workload.guidance_scale)
    except (ValueError, TypeError, RuntimeError) as error:  # a learned forecast is an improvement, not a need
        logger.warning("learned forecast weights skipped: %s: %s", type(error).__name__, error)
        return best.plan
    if not isinstance(learned, CachePlan):
        return best.plan
    scores = score_plan(pipe, workload, learned, reference)
    if significantly_better(scores, best.scores):
        best.scores = scores
        return learned
    return best.plan


def search_size(space: dict[str, Sequence[Any]] | None = None) -> int:
    """Progress-bar length: the reference + default run, and at most one fit per candidate and pass (a grid knob's
    value is tried with each explicit tail too: :func:`_candidates`)."""
    space = SEARCH_SPACE if space is None else space
    tails = 1 + sum(tail is not None for tail in space.get("tail", ()))
    per_pass = sum(len(values) * (tails if knob in GRID_KNOBS else 1) for knob, values in space.items())
    return 1 + SEARCH_PASSES * per_pass


class _NoProgress:
    def update(self, n: int = 1) -> None: ...

    def set_postfix_str(self, text: str) -> None: ...
