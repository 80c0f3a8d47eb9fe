"""Budget-driven schedules: a DuCa forecasting plan that spends a given FLOPs reduction well.

``enable_dual_cache(pipe, budget=3)`` asks for 3x fewer denoiser FLOPs. The plan is built from a
small set of principles, none fitted to a model (docs/methods.md, "Budget-driven schedules"):

1. **Full steps first.** A forecast of order k needs k + 1 full computations, and a full step is
   the only step that re-anchors every feature, so the schedule takes as many full steps as the
   budget affords (``budget`` -> the number K of full steps), and spends only what is left on
   partial recomputation. (Searching the interval last, rather than first, is what keeps a tight
   budget from buying long gaps filled with expensive partial steps.)
2. **Evenly spaced from step 0.** Step 0 is full and the first gap reuses it (order 0) until a second
   full computation gives the forecast its two points; the remaining full steps are spread evenly over
   the rest of the run, since an order-k extrapolation's error grows with the gap as ``gap ** (k + 1)``,
   and equal gaps keep the largest one smallest. (An earlier rule made the first order + 1 steps full
   where that did not lengthen the largest gap; spending that full step on the grid instead measured
   +8.1 dB on PixArt at 2x and +1.0 / +4.1 dB on the DiT at 50 steps, -0.3 dB on the DiT at 20 steps
   and 2x, and the same elsewhere: docs/methods.md. Front-loading the rest, gaps growing towards the end,
   was the other principled candidate: ``warp`` > 1 does it; it lost on both shipped models at every
   budget, so the default is even spacing, ``warp=1``; ``dualcache calibrate`` tries both, and the
   number of leading full steps.) **One forecast step after the last full step**: the even grid leaves
   about a gap's worth of forecast steps at the end of the run, where the features change fastest (their
   step-to-step change grows 5-10x over a run on every model measured), so where moving the last full step to
   the second-to-last step lengthens neither the largest gap nor the first (which reuses step 0, order 0) the
   rule does it (:func:`short_tail`; the last step itself stays a
   forecast: its error reaches the image scaled down, and a full last step costs an interior gap). On
   calibration images of four settings it changes the 2.5x rows at 20 steps and the 2.5-4x rows at 50 steps, all
   for the better (+0.5 to +4.1 dB); where it would lengthen the first gap it lost 2-4 dB (docs/methods.md).
   **The shortest gap first**: rounding the grid to whole steps leaves gaps of two lengths, and the first one
   reuses step 0 (order 0), so the rule makes it the short one and spreads the rest evenly again
   (:func:`short_first_gap`; on calibration images it changed 7 rows of six settings, +0.1 to +5.1 dB in six,
   -1.5 dB in one).
3. **Forecast, then recompute.** Every other step forecasts every cached output at ``order`` (1:
   linear extrapolation over the actual step spacing) and, with what the budget leaves, recomputes
   a fraction of the tokens of the modules that can be recomputed row by row (MLP and
   cross-attention; self-attention stays forecast, as in DuCa), running the blocks so that the
   current timestep's gates and norms apply. The fraction follows DuCa's published decreasing
   schedule (``ratio_schedule="pixart"``: more tokens at early steps and in early layers, step factor 1.9 - 1.8
   s/N, layers 1.6 -> 0.4, MLP 1.6, cross-attention 0.6), scaled to fill the budget; against a constant
   fraction it was at least as good in 14 of 16 (setting, budget) rows on calibration images of four settings,
   up to +1.4 dB, and lost 0.01 and 0.04 dB in the other two (docs/methods.md). **The first gap first**: the
   steps before the second full step reuse step 0 (the forecast has one point: order 0), an error first order in
   the gap where every later forecast step's is second order, so they recompute ten times the fraction of the
   rest (``first_gap_weight``; on calibration images of the seven settings it was chosen on +0.4 dB on average
   over 33 rows, from -0.55 to +1.9 dB; +0.05 dB on two models it was not chosen on: docs/methods.md). Where not
   even that is affordable the step skips the block stack and forecasts its output.
4. **One more full step, paid for by skipped calls.** A forecast step still runs the model outside its cached
   modules (about 2% of a full step on the DiT), so K full steps of N reach at most N / (K + 0.02 (N - K)), never
   N / K, and where the budget falls just short of that the rule loses a full step: the quality falls off a cliff.
   A step that skips the whole denoiser call costs nothing (its output is the order-k forecast of the full calls'
   outputs, :class:`~.plan.StepPlan` ``skip_call``), so the rule takes floor(N / b) full steps wherever the fewest
   skipped calls that pay for them (:func:`with_skipped_calls`; the steps nearest their last full step first,
   :func:`skipped_call_steps`) are at most half of the other steps, so that most of them still run the blocks and
   recompute tokens; with a scheduler that samples a flow-matching velocity (:func:`samples_flow`) any share. On
   calibration images of six settings, at every benchmark budget where it applies, the share separated gains from
   losses on the noise-predicting models (every row up to 0.6 gained, +0.1 to +5.1 dB; all eight losses, -0.6 to
   -6.3 dB, needed 0.75 or more), and the two flow models gained at every share (+1.9 to +6.8 dB); the settings
   it was not chosen on are checked by the benchmark: docs/methods.md, "Skipped calls".

The cost of each step comes from the engine's own FLOPs accounting of the model (the costs it
records at its first call), so the plan reaches the budget as the engine counts it. :class:`Schedule`
holds the knobs; :func:`budget_schedule` is the default rule and ``dualcache calibrate``
(:mod:`.calibrate`) searches the same knobs on calibration images.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .plan import (
    AGGRESSIVE,
    CONSERVATIVE,
    FULL,
    RATIO_SCHEDULES,
    SKIPPED_CALL,
    CachePlan,
    PlanLayout,
    RatioFn,
    StepPlan,
    num_fresh_tokens,
    plan_from_kinds,
)

logger = logging.getLogger(__name__)

MIN_BUDGET = 1.0  # exclusive: a budget of 1 is no caching
MAX_BUDGET = 10.0
#: tolerance within which a plan is said to reach its budget (relative, on the FLOPs ratio)
BUDGET_TOLERANCE = 0.03


def check_budget(value: Any) -> float:
    """``value`` as a float in (1, 10], else a clear TypeError / ValueError naming ``budget``."""
    import numpy as np

    if isinstance(value, np.generic) and isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"budget must be a number (the FLOPs reduction, e.g. 3 for 3x fewer FLOPs) in "
                        f"({MIN_BUDGET:g}, {MAX_BUDGET:g}], got {value!r} ({type(value).__name__})")
    value = float(value)
    if math.isnan(value) or not MIN_BUDGET < value <= MAX_BUDGET:
        raise ValueError(f"budget={value!r} is out of range: it is the FLOPs reduction of the denoiser "
                         f"(3 = 3x fewer FLOPs) and must be in ({MIN_BUDGET:g}, {MAX_BUDGET:g}]")
    return value


# --------------------------------------------------------------------------------------------- costs


@dataclass
class ModuleCall:
    """One cached module call of a full step: its FLOPs and how they scale with the rows computed."""

    block: int
    column: int
    flops: float  # full call
    scale: Callable[[int], float]  # rows computed -> share of ``flops``
    rows: int  # image rows of a full call (the rows a fraction is taken of)
    text_rows: int = 0  # rows recomputed with every partial call (a joint block's text tokens)
    partial: bool = True  # False: a fraction in (0, 1) computes the module whole


@dataclass
class CostModel:
    """FLOPs of one denoiser call under a :class:`StepPlan`, as the engine counts them."""

    model: float  # outside every block (always run)
    blocks: float  # inside blocks, outside cached modules (run unless the stack is skipped)
    calls: list[ModuleCall] = field(default_factory=list)

    @property
    def full(self) -> float:
        return self.model + self.blocks + sum(c.flops for c in self.calls)

    def step(self, step: StepPlan) -> float:
        if step.skip_call:
            return 0.0
        if step.skip_blocks:
            return self.model
        total = self.model + self.blocks
        for c in self.calls:
            fraction = step.fractions[c.block][c.column]
            if fraction >= 1.0 or (fraction > 0.0 and not c.partial):
                total += c.flops
            elif fraction > 0.0:
                fresh = num_fresh_tokens(fraction, c.rows)  # none: the engine returns the cache untouched
                total += c.flops * c.scale(fresh + c.text_rows) if fresh else 0.0
        return total

    def ratio(self, plan: CachePlan) -> float:
        """FLOPs reduction of ``plan``: uncached FLOPs over the plan's."""
        return plan.num_steps * self.full / sum(self.step(s) for s in plan.steps)

    @classmethod
    def from_engine(cls, costs: Any, modules: Sequence[Any], image_rows: Callable[[str], int] | None = None
                    ) -> CostModel:
        """From the engine's recorded :class:`~.engine.Costs`, its denoiser's cached modules and the image rows
        of each token-grid kind (``image_rows("space")``; without it every row is an image row)."""
        by_place = {(m.block, m.column): m for _, m in modules}
        calls = []
        for key, flops in costs.modules.items():
            block, column, index = key
            cached = by_place.get((block, column))
            rows, kv = costs.rows.get(key, (0, 0))
            if cached is None or not rows:
                continue
            image = min(rows, image_rows(cached.grid)) if image_rows is not None else rows
            partial = cached.spec.can_partial and cached.call_kind(index) == "image"
            full = cached.cost.flops(1, rows, kv) or 1
            calls.append(ModuleCall(block, column, float(flops),
                                    lambda r, c=cached.cost, kv=kv, full=full: c.flops(1, r, kv) / full,
                                    image, rows - image, partial))
        return cls(float(costs.model), float(sum(costs.blocks.values())), calls)

    @classmethod
    def uniform(cls, layout: PlanLayout, tokens: int = 256, overhead: float = 0.02) -> CostModel:
        """A rough model for when nothing was measured (tests, plans made offline): equal modules, linear in rows."""
        calls = [ModuleCall(b, m, 1.0, lambda r, t=tokens: r / t, tokens)
                 for b, names in enumerate(layout.block_modules) for m, name in enumerate(layout.modules)
                 if name in names]
        return cls(overhead * len(calls), 0.0, calls)


# ----------------------------------------------------------------------------------------- schedules


@dataclass(frozen=True)
class Schedule:
    """The knobs of a budget schedule (what ``dualcache calibrate`` searches).

    full_steps: K, the number of full steps; warmup: leading full steps (at least order + 1 where K
    allows); warp: placement of the rest (1 = even gaps, > 1 gaps growing towards the end);
    order: forecast order; fresh_ratio: fraction of tokens the partial modules recompute at the
    other steps (None: what the budget leaves); ratio_schedule: how that fraction varies over steps
    and layers (see :data:`plan.RATIO_SCHEDULES`); skip: the other steps skip the block stack
    instead of running the blocks with forecast outputs; ends: how much denser the full steps are near
    both ends of the run than in its middle (0 = not; see :func:`full_step_positions`); tail: how many
    forecast steps follow the last full step (None: what the even grid leaves; see :func:`short_tail`);
    short_first: the grid's first gap is its shortest (see :func:`short_first_gap`); first_gap_weight: how many
    times the fresh ratio the steps before the second full step recompute (they reuse step 0, order 0; see
    :func:`schedule_plan`); skipped_calls: how many of the other steps skip the whole denoiser call instead, their
    output forecast from the full calls' outputs at ``order`` (they cost nothing; see :func:`skipped_call_steps`).
    """

    full_steps: int
    warmup: int = 2
    warp: float = 1.0
    order: int = 1
    fresh_ratio: float | None = None
    ratio_schedule: str = "constant"
    skip: bool = False
    ends: float = 0.0
    tail: int | None = None
    short_first: bool = False
    first_gap_weight: float = 1.0
    skipped_calls: int = 0

    def describe(self) -> str:
        ratio = "-" if self.fresh_ratio is None else f"{self.fresh_ratio:.3f}"
        tail = ("" if self.tail is None else f" tail={self.tail}") + (" short-first" if self.short_first else "")
        first = f" first-gap x{self.first_gap_weight:g}" if self.first_gap_weight != 1 else ""
        calls = f" skipped-calls={self.skipped_calls}" if self.skipped_calls else ""
        return (f"K={self.full_steps} warmup={self.warmup} warp={self.warp:g} ends={self.ends:g}{tail} "
                f"order={self.order} ratio={ratio} ({self.ratio_schedule}{first}){' skip' if self.skip else ''}"
                f"{calls}")


def full_step_positions(num_steps: int, full_steps: int, warmup: int, warp: float, ends: float = 0.0,
                        tail: int | None = None, short_first: bool = False) -> list[int]:
    """Which steps are full: the first ``warmup``, then the rest on a grid with gaps growing as ``warp``.

    The grid runs from the last warm-up step to the end of the run, its last point a gap before it; with
    ``tail`` its last point is step ``num_steps - 1 - tail`` (so ``tail`` forecast steps follow it). Rounding
    leaves gaps of two lengths; ``short_first`` makes the grid's first gap the shortest (:func:`short_first_gap`).
    ``ends`` in [0, 1) makes the grid denser near both ends of the run, where the features change fastest:
    the grid point u becomes u - ends * sin(2 pi u) / (2 pi), so the gaps at the ends are (1 - ends) / (1 + ends)
    of those in the middle (calibration tries it; the default rule keeps 0, which measured better at 2x)."""
    full_steps = max(1, min(num_steps, full_steps))
    warmup = max(1, min(warmup, full_steps))
    positions = list(range(warmup))
    rest = full_steps - warmup
    if rest:
        start = warmup - 1
        if tail is None:  # rest + 1 equal gaps up to the end of the run
            span, intervals = num_steps - start, rest + 1
        else:  # rest equal gaps up to the step ``tail`` before the last
            span, intervals = max(rest, num_steps - 1 - tail - start), rest
        for j in range(1, rest + 1):
            u = (j / intervals) ** warp
            positions.append(start + span * (u - ends * math.sin(2 * math.pi * u) / (2 * math.pi)))
        positions = _distinct_steps(positions, num_steps)
        if short_first:
            positions = short_first_gap(positions, warmup, num_steps)
    return positions


def short_first_gap(positions: list[int], warmup: int, num_steps: int) -> list[int]:
    """``positions`` with the grid's first gap (the one after the last warm-up step) made its shortest and the
    rest spread evenly again up to the same last full step, unless that lengthens the largest gap.

    With one leading full step the first gap reuses step 0 (order 0: the forecast has no second point yet), so
    of the gaps rounding leaves it is the one to keep short (module docstring, principle 2)."""
    start, last, rest = positions[warmup - 1], positions[-1], len(positions) - warmup
    gaps = [b - a for a, b in zip(positions[warmup - 1:], positions[warmup:])]
    if rest < 2 or min(gaps) >= gaps[0]:
        return positions
    head = start + min(gaps)
    spread = [head + (last - head) * j / (rest - 1) for j in range(rest)]
    moved = _distinct_steps(positions[:warmup] + spread, num_steps)
    return moved if largest_gap(moved, num_steps) <= largest_gap(positions, num_steps) else positions


def _distinct_steps(points: list[float], num_steps: int) -> list[int]:
    """Round increasing points to distinct step indices in [0, num_steps)."""
    out: list[int] = []
    for i, p in enumerate(points):
        step = max(round(p), out[-1] + 1 if out else 0)
        step = min(step, num_steps - (len(points) - i))  # leave room for the points still to come
        out.append(step)
    return out


def schedule_plan(num_steps: int, layout: PlanLayout, schedule: Schedule, fresh_ratio: float = 0.0,
                  metadata: dict[str, Any] | None = None) -> CachePlan:
    """The plan of ``schedule`` (its fresh ratio, or ``fresh_ratio`` when the schedule leaves it open)."""
    positions = full_step_positions(num_steps, schedule.full_steps, schedule.warmup, schedule.warp, schedule.ends,
                                    schedule.tail, schedule.short_first)  # increasing
    full = set(positions)
    other = AGGRESSIVE if schedule.skip else CONSERVATIVE
    kinds = [FULL if i in full else other for i in range(num_steps)]
    for i in skipped_call_steps(positions, num_steps, schedule.skipped_calls):
        kinds[i] = SKIPPED_CALL
    ratio = schedule.fresh_ratio if schedule.fresh_ratio is not None else fresh_ratio
    ratio_fn = _first_gap_weighted(schedule.ratio_schedule, ratio, schedule.first_gap_weight,
                                   second_full=positions[1] if len(positions) > 1 else num_steps)
    plan = plan_from_kinds(kinds, layout, ratio_fn=ratio_fn,
                           aggressive="skip", interval=max(1, round(num_steps / max(1, len(full)))),
                           method="duca", forecast_order=schedule.order, metadata=dict(metadata or {}))
    plan.metadata.setdefault("schedule", {**schedule.__dict__, "fresh_ratio": ratio})
    return plan


def skipped_call_steps(positions: Sequence[int], num_steps: int, count: int) -> list[int]:
    """The ``count`` steps between the full steps at ``positions`` (increasing) whose calls are skipped: the
    nearest to their last full step first (an extrapolation's error grows with its distance), earlier steps before
    later ones, the first gap's steps last (with one point behind them they reuse step 0, order 0)."""
    full = set(positions)
    second = positions[1] if len(positions) > 1 else num_steps

    def priority(step: int) -> tuple[bool, int, int]:
        last_full = max(p for p in positions if p < step)
        return step < second, step - last_full, step

    return sorted((i for i in range(num_steps) if i not in full), key=priority)[:max(0, count)]


def _first_gap_weighted(ratio_schedule: str, ratio: float, weight: float, second_full: int) -> RatioFn:
    """``ratio_schedule`` at ``ratio``, and at ``weight`` times it for the steps before ``second_full``: with one
    leading full step those reuse step 0 (the forecast has one point, order 0), so their error is first order in
    the gap while every later forecast step extrapolates at order 1 (principle 3)."""
    rest = RATIO_SCHEDULES[ratio_schedule](ratio)
    if weight == 1:
        return rest
    first = RATIO_SCHEDULES[ratio_schedule](ratio * weight)

    def weighted(step: int, num_steps: int, block: int, num_blocks: int, role: str) -> float:
        if step < second_full:
            return min(1.0, first(step, num_steps, block, num_blocks, role))
        return rest(step, num_steps, block, num_blocks, role)

    return weighted


def affordable_full_steps(num_steps: int, budget: float, cost: CostModel, layout: PlanLayout, order: int = 1) -> int:
    """The most full steps whose plan (the other steps forecast, recomputing nothing) stays within ``budget``."""
    best = 1
    for k in range(1, num_steps + 1):
        plan = schedule_plan(num_steps, layout, Schedule(k, warmup=order + 1, order=order), 0.0)
        if cost.ratio(plan) < budget * (1 - 1e-9):
            break
        best = k
    return best


def fit_ratio(num_steps: int, layout: PlanLayout, schedule: Schedule, budget: float, cost: CostModel,
              iterations: int = 30) -> tuple[CachePlan, float] | None:
    """The plan of ``schedule`` whose fresh ratio brings its FLOPs nearest the budget's without exceeding them (its
    FLOPs reduction at least ``budget``, and within :data:`BUDGET_TOLERANCE` of it unless nothing is left to fit).

    None when even recomputing nothing needs more FLOPs than the budget allows (such a plan would buy its quality
    with compute the budget does not give: calibration compares candidates at the budget)."""
    def plan_at(r: float) -> CachePlan:
        return schedule_plan(num_steps, layout, replace(schedule, fresh_ratio=r))

    low_plan = plan_at(0.0)
    if cost.ratio(low_plan) < budget * (1 - 1e-9):
        return None
    high_plan = plan_at(1.0)
    if cost.ratio(high_plan) >= budget:  # nothing left to fit (e.g. steps that skip the stack): on budget or not at all
        return (high_plan, 1.0) if cost.ratio(high_plan) <= budget * (1 + BUDGET_TOLERANCE) else None
    low, high = 0.0, 1.0
    for _ in range(iterations):  # ratio falls as the fresh ratio grows
        mid = (low + high) / 2
        if cost.ratio(plan_at(mid)) >= budget:
            low = mid
        else:
            high = mid
    return _top_up(plan_at(low), plan_at(high), budget, cost), low


def _top_up(low: CachePlan, high: CachePlan, budget: float, cost: CostModel) -> CachePlan:
    """``low`` with its earliest steps taken from ``high`` while the budget holds (tokens come in whole
    rows, so one fresh ratio for every step can land a few percent off the budget)."""
    total, target = sum(cost.step(s) for s in low.steps), low.num_steps * cost.full / budget
    for i, (a, b) in enumerate(zip(low.steps, high.steps)):
        extra = cost.step(b) - cost.step(a)
        if extra > 0 and total + extra <= target:
            low.steps[i], total = b, total + extra
    return low


#: how the default rule spreads the recomputed tokens over steps and layers: DuCa's published decreasing schedule
#: (principle 3 in the module docstring)
DEFAULT_RATIO_SCHEDULE = "pixart"
#: how many times the fresh ratio the default rule's first gap recomputes (it reuses step 0, order 0; principle 3).
#: 10, not more: a larger weight leaves the later steps almost no tokens and lost up to 1 dB where the budget leaves
#: many (docs/methods.md, "The first gap")
DEFAULT_FIRST_GAP_WEIGHT = 10.0
#: whether the default rule pays for the full steps the budget affords by skipping denoiser calls (principle 4)
DEFAULT_SKIP_CALLS = True
#: the most of the steps between full steps whose calls the default rule skips to afford one more full step: half,
#: so that most of them still run the blocks (principle 4; docs/methods.md, "Skipped calls")
DEFAULT_MAX_SKIPPED_SHARE = 0.5
#: the same for a scheduler that samples a flow-matching velocity, whose forecasts held over every share measured
FLOW_MAX_SKIPPED_SHARE = 1.0


def samples_flow(scheduler: Any) -> bool:
    """Whether ``scheduler`` integrates a flow-matching velocity (diffusers' FlowMatch* schedulers, or any with
    ``prediction_type="flow_prediction"``, as DPM-Solver++ and UniPC run Sana and Wan), not a noise or sample
    prediction."""
    config = getattr(scheduler, "config", None) or {}
    return config.get("prediction_type") == "flow_prediction" or type(scheduler).__name__.startswith("FlowMatch")


def largest_gap(positions: Sequence[int], num_steps: int) -> int:
    """The most steps from one full step to the next, the end of the run counting as the next after the last."""
    return max(b - a for a, b in zip(positions, [*positions[1:], num_steps]))


def short_tail(num_steps: int, full_steps: int, warmup: int = 1, warp: float = 1.0) -> int | None:
    """1 where the even grid leaves more than one forecast step after its last full step and ending the grid at
    the second-to-last step lengthens neither its largest gap nor its first (after one leading full step the first
    gap reuses step 0, order 0, so it is the costliest to lengthen); else None (the even grid). Principle 2 of the
    module docstring."""
    even = full_step_positions(num_steps, full_steps, warmup, warp)
    if len(even) <= warmup or num_steps - 1 - even[-1] <= 1:
        return None
    shifted = full_step_positions(num_steps, full_steps, warmup, warp, tail=1)
    keeps_largest = largest_gap(shifted, num_steps) <= largest_gap(even, num_steps)
    keeps_first = shifted[warmup] - shifted[warmup - 1] <= even[warmup] - even[warmup - 1]
    return 1 if keeps_largest and keeps_first else None


def default_schedule(num_steps: int, full_steps: int, order: int = 1, warp: float = 1.0) -> Schedule:
    """The default rule's knobs for ``full_steps`` full steps of ``num_steps`` (its fresh ratio left to
    :func:`fit_ratio`): one leading full step, the rest evenly spaced with the shortest gap first, one forecast step
    after the last full step where that lengthens no gap (principle 2), DuCa's decreasing token schedule with the
    first gap weighted (principle 3)."""
    return Schedule(full_steps, warmup=1, warp=warp, order=order, ratio_schedule=DEFAULT_RATIO_SCHEDULE,
                    tail=short_tail(num_steps, full_steps, 1, warp), short_first=True,
                    first_gap_weight=DEFAULT_FIRST_GAP_WEIGHT)


def with_skipped_calls(num_steps: int, layout: PlanLayout, budget: float, cost: CostModel, order: int = 1,
                       warp: float = 1.0, max_share: float | None = None) -> Schedule | None:
    """The default schedule with floor(num_steps / budget) full steps, the most a budget affords, paid for by skipping
    the fewest denoiser calls that bring it within the budget (:func:`skipped_call_steps`); None where that takes
    more than ``max_share`` of the other steps (default :data:`DEFAULT_MAX_SKIPPED_SHARE`)."""
    max_share = DEFAULT_MAX_SKIPPED_SHARE if max_share is None else max_share
    full_steps = max(1, math.floor(num_steps / budget + 1e-9))
    base = default_schedule(num_steps, full_steps, order, warp)
    for count in range(math.floor(max_share * (num_steps - full_steps) + 1e-9) + 1):
        schedule = replace(base, skipped_calls=count, fresh_ratio=0.0)
        if cost.ratio(schedule_plan(num_steps, layout, schedule)) >= budget * (1 - 1e-9):
            return replace(schedule, fresh_ratio=None)
    return None


def budget_schedule(num_steps: int, layout: PlanLayout, budget: float, cost: CostModel, order: int = 1,
                    warp: float = 1.0, skip_calls: bool | None = None, flow: bool = False) -> CachePlan:
    """The default budget rule (module docstring): as many full steps as fit, evenly spaced from step 0 (shortest
    gap first, ending one step before the last where no gap grows: :func:`default_schedule`), the rest forecast at
    ``order`` with DuCa's decreasing token schedule, scaled to fill what the budget leaves."""
    budget = check_budget(budget)
    skip_calls = DEFAULT_SKIP_CALLS if skip_calls is None else skip_calls
    base = default_schedule(num_steps, affordable_full_steps(num_steps, budget, cost, layout, order), order, warp)
    candidates = [replace(base, skip=False), replace(base, skip=True)]
    if skip_calls:
        share = FLOW_MAX_SKIPPED_SHARE if flow else DEFAULT_MAX_SKIPPED_SHARE
        paid = with_skipped_calls(num_steps, layout, budget, cost, order, warp, share)
        if paid is not None and paid.full_steps > base.full_steps:
            candidates.insert(0, paid)
    for candidate in candidates:
        fitted = fit_ratio(num_steps, layout, candidate, budget, cost)
        if fitted is not None:
            plan, ratio = fitted
            break
    else:  # not even skipping every other step reaches it (a budget beyond steps / K): skip with K full steps
        plan, ratio = schedule_plan(num_steps, layout, replace(base, skip=True)), 0.0
    predicted = cost.ratio(plan)
    if abs(predicted / budget - 1) > BUDGET_TOLERANCE:
        logger.warning("budget=%g cannot be reached with %d steps: the nearest plan the rule makes reduces the "
                       "denoiser's FLOPs %.2fx (%s)", budget, num_steps, predicted,
                       "more steps or a lower budget reach it" if predicted < budget else "more than asked")
    plan.metadata["budget"] = {"target": budget, "predicted": round(predicted, 4), "rule": "default",
                               "fresh_ratio": round(ratio, 4)}
    return plan
