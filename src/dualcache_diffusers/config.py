"""DualCacheConfig: every user choice, validated on construction, plus presets per model family."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .budget import CostModel, budget_schedule, check_budget
from .plan import (
    AGGRESSIVE,
    CONSERVATIVE,
    FULL,
    RATIO_SCHEDULES,
    CachePlan,
    PlanLayout,
    cycle_step_kinds,
    dit_duca_step_kinds,
    dit_toca_step_kinds,
    plan_from_kinds,
)

METHODS = ("duca", "toca", "fora", "full")
SELECTIONS = ("vnorm", "random", "attention", "forecast_error", "forecast_error+vnorm")
AGGRESSIVE_VARIANTS = ("skip", "reuse")
SELF_ATTENTION_MODES = ("reuse", "partial")
SCHEDULES = ("cycle", "dit-duca")
CFG_SELECTIONS = ("shared", "separate")


MAX_SEED = 2**63 - 1
MAX_INTERVAL = 1000
MAX_WEIGHT = 100.0  # staleness_weight, spatial_bonus: multiples of a token score; far beyond any useful value
MAX_SPATIAL_GRID = 64
MAX_FIRST_FULL_STEPS = 1000
MAX_INFERENCE_STEPS = 10_000
MAX_FORECAST_ORDER = 4


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    """``value`` if it is one of ``allowed`` (a string; numpy strings become ``str``), else a clear error."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {', '.join(map(repr, allowed))}; got {_describe(value)}")
    value = str(value)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}")
    return value


def _number(name: str, value: Any, low: float, high: float | None = None, integer: bool = False) -> int | float:
    """``value`` as a Python int / float if it is a finite number in [low, high], else a clear error.

    numpy scalars (``np.int64``, ``np.float32``, ...) are accepted and converted; bools, strings, arrays,
    NaN and infinities are not."""
    if isinstance(value, np.generic) and not isinstance(value, np.bool_):
        if integer and isinstance(value, np.integer):
            value = int(value)
        elif not integer and isinstance(value, (np.integer, np.floating)):
            value = value.item()
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an integer" if integer else "a number"
        raise TypeError(f"{name} must be {what} in {_bounds(low, high)}, got {_describe(value)}")
    if isinstance(value, float) and math.isnan(value):
        raise TypeError(f"{name} must be a number in {_bounds(low, high)}, got nan")
    if isinstance(value, float) and math.isinf(value):
        raise ValueError(f"{name}={value!r} is not allowed; it must be a finite number in {_bounds(low, high)}")
    if value < low or (high is not None and value > high):  # exact for huge ints (no float conversion)
        shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:20]}... ({len(repr(value))} digits)"
        raise ValueError(f"{name}={shown} is out of range; allowed: {_bounds(low, high)}")
    return int(value) if integer else (float(value) if isinstance(value, float) else value)


CACHE_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "npu", "hpu")


def _cache_device(value: Any) -> str | None:
    """``cache_device`` normalized: None (on the model's device) or a torch device string."""
    if value is None or (isinstance(value, str) and value == "same"):
        return None
    allowed = f"None, 'same', 'cpu' or a torch device string such as 'cuda:1' (types: {', '.join(CACHE_DEVICE_TYPES)})"
    import torch  # here, so that importing the config does not import torch

    if not isinstance(value, (str, torch.device)):
        raise TypeError(f"cache_device must be {allowed}; got {_describe(value)}")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"cache_device={value!r} is not a device; allowed: {allowed}") from None
    if device.type not in CACHE_DEVICE_TYPES:
        raise ValueError(f"cache_device={value!r} is not supported; allowed: {allowed}")
    return str(device)


def _bounds(low: float, high: float | None) -> str:
    return f"[{low}, {high}]" if high is not None else f">= {low}"


@dataclass
class DualCacheConfig:
    """What the engine does. Build one directly, or from a preset with :meth:`from_preset`.

    Attributes:
        method: "duca" (full / conservative / aggressive), "toca" (full / conservative),
            "fora" (full / reuse every module), "full" (no caching).
        interval: cycle length N (a full step every N steps). For ``schedule="dit-duca"`` it is
            the authors' base threshold from which the dynamic DiT interval is derived.
        schedule: "cycle" (fixed cycles counted from step 0) or "dit-duca" (the DiT DDIM rule of the
            ToCa / DuCa code: F,C,A,... for method "duca", F,C,C,... for "toca").
        fresh_ratio: base fraction of tokens recomputed at conservative steps, in [0, 1].
        ratio_schedule: how the fresh ratio varies over steps, layers and modules:
            "constant", "dit", "pixart", "pixart-toca" (the published ToCa/DuCa schedulers).
        selection: token scorer: "vnorm" (V-caching: smallest value norms recomputed; works with
            fused attention kernels), "random", or "attention" (ToCa's attention score; needs
            explicit attention probabilities, computed at full steps, so not flash-compatible),
            "forecast_error" (dual forecasting: the tokens whose forecast was worst at the last full
            step, i.e. the distance between what the forecast of order ``forecast_order`` (reuse at 0)
            predicted for that step and what it computed; V-norm before the first measured error) or
            "forecast_error+vnorm" (the sum of both scores). Both are flash-compatible.
        aggressive: "skip" (reuse the block stack's cached output) or "reuse" (run the blocks,
            reuse every module's cached output).
        self_attention: at conservative steps "reuse" self- and joint attention whole (DuCa) or
            recompute it for the selected queries (plus every text row of a joint attention) against
            all keys/values ("partial"), where the family's adapter supports it.
        staleness_weight: bonus per conservative step a token has not been recomputed (x count / N).
        spatial_bonus, spatial_grid: the best token of every grid x grid cell gets
            ``spatial_bonus x`` its score on top, spreading recomputation over the image.
        first_full_steps: leading steps that are always full.
        num_inference_steps: only needed when caching a bare transformer without its pipeline's
            scheduler (the engine then cannot read the step count).
        seed: seed of the random scorer (selection is deterministic given the seed).
        cfg_selection: for a batch holding both CFG halves of the same latents, "shared" (one score per
            image, the halves averaged, so both halves recompute the same tokens; DuCa's PixArt code)
            or "separate" (each half scores and picks its own tokens, as the authors' DiT code does).
        forecast_order: 0 reuses cached outputs as they are; k in 1..4 extrapolates every reused
            output (and the skipped block stack) from the last k + 1 full computations, a degree-k
            polynomial in the step (TaylorSeer's forecast, at the actual step spacing).
        budget: a FLOPs reduction of the denoiser (e.g. 3 for 3x fewer FLOPs, in (1, 10]): the schedule
            is then built for it by :func:`budget.budget_schedule` from the model's measured costs,
            replacing interval / schedule / fresh_ratio / ratio_schedule / first_full_steps (the
            forecast order, selection and token options still apply).
        forecast_reanchor: when forecasting, a partial step's output (forecast rows plus the recomputed
            ones) is the newest point the forecasts start from until the module's next full computation,
            so the recomputed rows are forecast from their fresh values; the other rows continue on the
            same polynomial. One more stored output per partially recomputed module; the skipped stack
            is not re-anchored (measured worse, docs/methods.md).
        plan: a fixed :class:`CachePlan` (or a path to its JSON) overriding the schedule options.
        family: the model family whose preset this config is (enabling it on another family is refused).
        cache_device: where cached features (module outputs, the block stack's output, forecast history)
            are kept: None or "same" (default: on the model's device), "cpu" (pinned host memory when the
            model is on CUDA, copied asynchronously and brought back one block ahead of use; for long
            videos whose caches do not fit next to the model), or another torch device string such as
            "cuda:1". Outputs are the same wherever the cache lives; token scores stay on the model.
    """

    method: str = "duca"
    interval: int = 3
    schedule: str = "cycle"
    fresh_ratio: float = 0.3
    ratio_schedule: str = "constant"
    selection: str = "vnorm"
    aggressive: str = "skip"
    self_attention: str = "reuse"
    staleness_weight: float = 0.25
    spatial_bonus: float = 0.0
    spatial_grid: int = 2
    first_full_steps: int = 1
    num_inference_steps: int | None = None
    seed: int = 0
    cfg_selection: str = "shared"
    forecast_order: int = 0
    budget: float | None = None
    forecast_reanchor: bool = False
    plan: CachePlan | None = field(default=None, repr=False)
    family: str | None = None  # the model family whose preset this is (set by from_preset)
    cache_device: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.plan, (str, Path)):
            self.plan = load_plan(self.plan)
        if self.plan is not None and not isinstance(self.plan, CachePlan):
            raise TypeError(f"plan must be a CachePlan or a path to a plan JSON, got {type(self.plan).__name__}")
        self.method = _choice("method", self.method, (*METHODS, "plan"))
        if self.method == "plan" and self.plan is None:
            raise ValueError("method='plan' needs plan=... (a CachePlan or a path to a plan JSON); "
                             f"without a plan use one of {', '.join(map(repr, METHODS))}")
        self.interval = _number("interval", self.interval, 1, MAX_INTERVAL, integer=True)
        self.schedule = _choice("schedule", self.schedule, SCHEDULES)
        self.fresh_ratio = _number("fresh_ratio", self.fresh_ratio, 0.0, 1.0)
        self.ratio_schedule = _choice("ratio_schedule", self.ratio_schedule, tuple(RATIO_SCHEDULES))
        self.selection = _choice("selection", self.selection, SELECTIONS)
        self.aggressive = _choice("aggressive", self.aggressive, AGGRESSIVE_VARIANTS)
        self.self_attention = _choice("self_attention", self.self_attention, SELF_ATTENTION_MODES)
        self.staleness_weight = _number("staleness_weight", self.staleness_weight, 0.0, MAX_WEIGHT)
        self.spatial_bonus = _number("spatial_bonus", self.spatial_bonus, 0.0, MAX_WEIGHT)
        self.spatial_grid = _number("spatial_grid", self.spatial_grid, 1, MAX_SPATIAL_GRID, integer=True)
        self.first_full_steps = _number("first_full_steps", self.first_full_steps, 1, MAX_FIRST_FULL_STEPS,
                                        integer=True)
        if self.num_inference_steps is not None:
            self.num_inference_steps = _number("num_inference_steps", self.num_inference_steps, 1,
                                               MAX_INFERENCE_STEPS, integer=True)
        self.seed = _number("seed", self.seed, 0, MAX_SEED, integer=True)
        self.cfg_selection = _choice("cfg_selection", self.cfg_selection, CFG_SELECTIONS)
        self.forecast_order = _number("forecast_order", self.forecast_order, 0, MAX_FORECAST_ORDER, integer=True)
        self.cache_device = _cache_device(self.cache_device)
        if self.budget is not None:
            self.budget = check_budget(self.budget)
            if self.plan is not None:
                raise ValueError("pass either budget=... or plan=..., not both: a plan fixes its own FLOPs")
            if self.method != "duca":
                raise ValueError(f"budget={self.budget:g} builds a DuCa forecasting schedule; it cannot be combined "
                                 f"with method={self.method!r} (use method='duca', or drop budget)")
        if not isinstance(self.forecast_reanchor, (bool, np.bool_)):
            raise TypeError(f"forecast_reanchor must be True or False, got {_describe(self.forecast_reanchor)}")
        self.forecast_reanchor = bool(self.forecast_reanchor)
        if self.plan is not None:
            self.method = "plan"

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str = "duca", family: str = "default", **overrides: Any) -> DualCacheConfig:
        """The published settings of ``name`` for a model ``family`` ("dit", "pixart", "default")."""
        _choice("config", name, METHODS)
        values = dict(PRESETS.get(family, PRESETS["default"])[name])
        values.update(overrides)
        if family in PRESETS and family != "default":
            values.setdefault("family", family)
        return cls(**values)

    def replace(self, **overrides: Any) -> DualCacheConfig:
        check_override_names(overrides)
        return dataclasses.replace(self, **overrides)

    def build_plan(self, num_steps: int, layout: PlanLayout, cost: CostModel | None = None,
                   flow: bool = False) -> CachePlan:
        """The plan for one generation of ``num_steps`` denoiser calls of a model of ``layout``.

        With a ``budget``, ``cost`` (the model's FLOPs per step, :class:`budget.CostModel`) sizes the
        schedule; without one a rough uniform cost model is used; ``flow``: the scheduler samples a
        flow-matching velocity (the rule may skip more calls: :func:`budget.budget_schedule`)."""
        if self.budget is not None and self.plan is None:
            order = self.forecast_order or 1
            plan = budget_schedule(num_steps, layout, self.budget, cost or CostModel.uniform(layout), order=order,
                                   flow=flow)
            plan.metadata["config"] = self.to_dict()
            return plan
        if self.plan is not None:
            if self.plan.num_steps != num_steps:
                raise ValueError(
                    f"the cache plan was made for {self.plan.num_steps} denoiser calls but this generation makes "
                    f"{num_steps}; call the pipeline with num_inference_steps matching the plan, or resample it "
                    f"with plan.resample({num_steps}) (documented in docs/plans.md)"
                )
            check_plan_fits(self.plan, layout)
            return self.plan
        if self.method == "full":
            kinds = [FULL] * num_steps
        elif self.schedule == "dit-duca" and self.method == "duca":
            kinds = dit_duca_step_kinds(num_steps, self.interval)
        elif self.schedule == "dit-duca" and self.method == "toca":
            kinds = dit_toca_step_kinds(num_steps, self.interval)
        else:
            kinds = cycle_step_kinds(num_steps, self.interval, self.method, self.first_full_steps)
        kinds = [FULL if i < self.first_full_steps else k for i, k in enumerate(kinds)]
        aggressive = "reuse" if self.method == "fora" else self.aggressive
        plan = plan_from_kinds(
            kinds,
            layout,
            ratio_fn=RATIO_SCHEDULES[self.ratio_schedule](self.fresh_ratio),
            aggressive=aggressive,
            self_attention=self.self_attention,
            interval=self.interval,
            method=self.method,
            forecast_order=self.forecast_order,
            metadata={"config": self.to_dict()},
        )
        return plan

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "plan"}


CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(DualCacheConfig))


def check_override_names(overrides: dict[str, Any]) -> None:
    unknown = sorted(set(overrides) - set(CONFIG_FIELDS))
    if unknown:
        raise TypeError(f"unknown cache option(s) {unknown}; allowed: {', '.join(CONFIG_FIELDS)}")


def check_plan_fits(plan: CachePlan, layout: PlanLayout) -> None:
    """A ValueError unless ``plan`` describes a model of ``layout`` and only recomputes rows of modules
    that can be recomputed row by row."""
    if not plan.fits(layout):
        mine = f"{layout.num_blocks} blocks x {layout.modules}"
        if not layout.uniform:
            mine += " (modules per block differ)"
        raise ValueError(f"the cache plan is for {plan.describe_layout()} but the model has {mine}")
    for i, step in enumerate(plan.steps):
        for b, row in enumerate(step.fractions):
            for m, fraction in enumerate(row):
                name = plan.modules[m]
                if 0.0 < fraction < 1.0 and plan.present(b, m) and not layout.can_partial(b, name):
                    partial = sorted(layout.block_partial[b] if layout.block_partial else layout.partial)
                    raise ValueError(
                        f"the cache plan recomputes {fraction:.2f} of the rows of {name!r} (step {i}, block {b}), but "
                        f"{name!r} can only be computed or reused whole in that block (role "
                        f"{layout.role(b, name)}); partial modules there: {partial}"
                    )


def load_plan(path: str | Path) -> CachePlan:
    return CachePlan.from_json(Path(path))


# Published settings per family (docs/methods.md says where each number comes from).
# Every DuCa preset forecasts (forecast_order=1): reused outputs and the skipped stack are
# extrapolated linearly from the last two full computations. Measured on the shipped DiT and PixArt,
# at 20 and 50 steps, DDIM and DPM-Solver, it gained 5-11 dB PSNR at the same FLOPs (docs/methods.md);
# forecast_order=0 gives the published reuse-only DuCa.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "dit": {
        # DuCa on DiT, tuned (docs/methods.md): F,C,A cycles of 3 with DuCa's decreasing (PixArt)
        # ratio scheduler. The published DiT rule (schedule="dit-duca", ratio_schedule="dit",
        # fresh_ratio=0.05) leaves long gaps and recomputes no token in the first quarter of the
        # run; on our DiT it lost to FORA at equal FLOPs (15.5 vs 27.4 dB PSNR at 2.5x).
        "duca": dict(method="duca", schedule="cycle", interval=3, fresh_ratio=0.06, ratio_schedule="pixart",
                     selection="vnorm", aggressive="skip", spatial_bonus=0.8, spatial_grid=2, forecast_order=1),
        # ToCa on DiT as the authors run it with DDIM: their interval rule (schedule="dit-duca", threshold 4:
        # 7 full steps in 20, forced every other step in [0.2, 0.4) of the run), fresh ratio 0.07 with their DiT
        # ratio scheduler. Selection is V-norm (flash-compatible) instead of their attention score
        # (selection="attention" gives it); docs/methods.md lists every departure.
        "toca": dict(method="toca", schedule="dit-duca", interval=4, fresh_ratio=0.07, ratio_schedule="dit",
                     selection="vnorm", spatial_bonus=0.6, spatial_grid=2),
        "fora": dict(method="fora", interval=3),
        "full": dict(method="full"),
    },
    "pixart": {
        # DuCa PixArt-alpha: F,C,A cycles of 3. The published fresh ratio 0.75 recomputes so many
        # tokens (its MLP ratio clamps at 1 in early steps) that 20 steps save only 1.96x FLOPs;
        # 0.5 keeps the schedule and reaches 2.07x (docs/methods.md).
        "duca": dict(method="duca", interval=3, fresh_ratio=0.5, ratio_schedule="pixart", selection="vnorm",
                     aggressive="skip", spatial_bonus=0.4, spatial_grid=4, forecast_order=1),
        "toca": dict(method="toca", interval=3, fresh_ratio=0.30, ratio_schedule="pixart-toca",
                     selection="vnorm", spatial_bonus=0.4, spatial_grid=4),
        "fora": dict(method="fora", interval=3),
        "full": dict(method="full"),
    },
    "default": {
        "duca": dict(method="duca", interval=3, fresh_ratio=0.3, ratio_schedule="constant", selection="vnorm",
                     aggressive="skip", forecast_order=1),
        # ToCa's FLUX setting (ToCa5 in RESEARCH.md) is N=5; 4 keeps more full steps on short runs
        "toca": dict(method="toca", interval=4, fresh_ratio=0.3, ratio_schedule="constant", selection="vnorm"),
        "fora": dict(method="fora", interval=3),
        "full": dict(method="full"),
    },
}

__all__ = ["AGGRESSIVE", "CONSERVATIVE", "METHODS", "PRESETS", "SELECTIONS", "DualCacheConfig"]
