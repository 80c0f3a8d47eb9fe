"""Learned linear forecasts: per-step weights over the last few full computations, fitted on the model itself.

A plan's forecast at step ``t`` is ``sum_j w_j h_j`` over the last ``L`` stored full computations
``h_j`` of an output (oldest first). Lagrange extrapolation (TaylorSeer) fixes ``w`` from the step
numbers; here ``w`` is fitted per step by ridge regression on calibration trajectories, uncached
generations in which every module output (and the block stack's) is seen at every step:

    minimize  sum over outputs, samples  ||sum_j w_j h_j - h_t||^2  +  lam ||w - w_taylor||^2

with ``lam = ridge * trace(G) / L`` (``G`` the Gram matrix of the ``h_j``), so ``ridge`` does not depend on
the features' scale. The prior is the plan's own Lagrange weights, and the objective at ``w_taylor`` is
Taylor's error, so on the calibration data the fitted weights never do worse than Taylor (the fit report
in the plan's metadata gives both errors per step). Only sufficient statistics are kept: an ``L x L``
Gram matrix, an ``L`` vector and a scalar per step, plus the last ``L`` computations of each output.

Which computations are "stored" follows the engine: an output's history holds the steps at which the
plan computes it whole (and, with ``reanchor``, the last partial step since then, where the engine stores
forecast plus fresh rows and the fit sees the true output); the stack's history holds the full steps. The values
come from uncached trajectories, whereas a cached run's stored values drift from them; that gap is not
modelled (as in L2P).

Use::

    plan = DualCacheConfig.from_preset("fora", "dit", forecast_order=1).build_plan(20, layout)
    plan = fit_forecast_weights(pipe, plan, seeds=[100, 101])
    enable_dual_cache(pipe, plan=plan)
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from .forecast import lagrange_weights
from .plan import Action, CachePlan, action_of, check_forecast_weights
from .plan_schema import MAX_FORECAST_ORDER, MAX_FORECAST_WEIGHT

DEFAULT_RIDGE = 0.01


# ------------------------------------------------------------------------------------------------
# The regression (pure numpy; what the unit tests check on synthetic data)
# ------------------------------------------------------------------------------------------------
@dataclass
class StepStats:
    """Sufficient statistics of one step's regression: ``G = H H^T``, ``b = H y``, ``c = y^T y``."""

    size: int
    gram: np.ndarray = field(init=False)
    cross: np.ndarray = field(init=False)
    target: float = 0.0
    steps: Counter = field(default_factory=Counter)  # the history's step numbers, per output seen

    def __post_init__(self) -> None:
        self.gram = np.zeros((self.size, self.size))
        self.cross = np.zeros(self.size)

    def add(self, history: Sequence[torch.Tensor], target: torch.Tensor) -> None:
        """One output: its last ``size`` stored values (oldest first) and its true value at the step."""
        flat = torch.stack([h.detach().reshape(-1).double() for h in history])  # (L, D)
        y = target.detach().reshape(-1).double()
        self.gram += (flat @ flat.T).cpu().numpy()
        self.cross += (flat @ y).cpu().numpy()
        self.target += float(y @ y)

    def error(self, weights: Sequence[float]) -> float:
        """``sum ||H^T w - y||^2`` over the outputs added, from the statistics."""
        w = np.asarray(weights, dtype=np.float64)
        return max(0.0, float(w @ self.gram @ w - 2 * w @ self.cross + self.target))


def solve_ridge(stats: StepStats, prior: Sequence[float], ridge: float) -> np.ndarray:
    """``argmin_w ||H^T w - y||^2 + lam ||w - prior||^2`` with ``lam = ridge * trace(G) / L``."""
    prior = np.asarray(prior, dtype=np.float64)
    lam = ridge * np.trace(stats.gram) / stats.size
    system = stats.gram + lam * np.eye(stats.size)
    weights = np.linalg.lstsq(system, stats.cross + lam * prior, rcond=None)[0]
    if stats.error(weights) > stats.error(prior):  # only by rounding on a singular system: keep the prior
        return prior
    return weights


# ------------------------------------------------------------------------------------------------
# Which outputs a plan forecasts, and from which of its steps
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Output:
    """A cached module of one block (``column`` in the plan), or the block stack (``column`` None)."""

    block: int
    column: int | None
    can_partial: bool = True
    stream: int = 0  # the stack: which element of the last block's output is the image stream


def _stored_at(plan: CachePlan, out: _Output, step: int, reanchor: bool) -> str | None:
    """How the engine keeps this output's value at ``step``: "full" (joins the history of full
    computations), "anchor" (re-anchored partial output, until the next full one) or None."""
    s = plan.steps[step]
    if out.column is None:
        return "full" if s.is_full else None
    if s.skips_blocks:
        return None
    action = action_of(s.fractions[out.block][out.column])
    if action is Action.COMPUTE or (action is Action.PARTIAL and not out.can_partial):
        return "full"
    return "anchor" if action is Action.PARTIAL and reanchor and s.forecast_order > 0 else None


def _forecast_at(plan: CachePlan, out: _Output, step: int) -> bool:
    """Whether the engine forecasts this output at ``step``."""
    s = plan.steps[step]
    if not s.forecast_order:
        return False
    if out.column is None:
        return s.skip_blocks and not s.skip_call
    if s.skips_blocks:
        return False
    action = action_of(s.fractions[out.block][out.column])
    return action is Action.REUSE or (action is Action.PARTIAL and out.can_partial)


# ------------------------------------------------------------------------------------------------
# Recording calibration trajectories
# ------------------------------------------------------------------------------------------------
class _Recorder:
    """Forward hooks on one denoiser's cached modules and last block, adding each forecast step's
    (history, target) pairs to that step's statistics as an uncached generation runs."""

    def __init__(self, model: torch.nn.Module, adapter: Any, plan: CachePlan, sizes: list[int], reanchor: bool,
                 stats: dict[int, StepStats]) -> None:
        from .engine import _timestep_value

        self.plan, self.sizes, self.reanchor, self.stats = plan, sizes, reanchor, stats
        self._timestep = lambda args, kwargs: _timestep_value(adapter.timestep(args, kwargs), sync=True)
        self.keep = max(sizes)
        infos = adapter.block_infos(model)
        columns = {name: i for i, name in enumerate(plan.modules)}
        self.handles = [model.register_forward_pre_hook(self._begin_call, with_kwargs=True)]
        for info in infos:
            for spec in info.modules:
                out = _Output(info.index, columns[spec.name], spec.can_partial)
                module = getattr(info.block, spec.name)
                self.handles.append(module.register_forward_hook(self._module_hook(out)))
        last = _Output(infos[-1].index, None, stream=1 if infos[-1].spec.outputs == "e,h" else 0)
        self.handles.append(infos[-1].block.register_forward_hook(self._module_hook(last)))
        self.new_generation()

    def new_generation(self) -> None:
        self.step, self.timestep, self.branch = -1, None, 0
        self.calls: Counter = Counter()
        self.history: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
        self.anchors: dict[tuple, tuple[int, torch.Tensor]] = {}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _begin_call(self, module, args, kwargs) -> None:
        timestep = self._timestep(args, kwargs)
        if self.step < 0 or timestep != self.timestep:
            self.step, self.timestep, self.branch = self.step + 1, timestep, 0
        else:
            self.branch += 1  # another CFG branch at the same timestep
        self.calls.clear()

    def _module_hook(self, out: _Output):
        def hook(module, args, output):
            if self.step < 0 or self.step >= self.plan.num_steps:
                return
            value = output[out.stream] if isinstance(output, tuple) and out.column is None else output
            if not isinstance(value, torch.Tensor):
                return  # tuple outputs of modules are not forecast here
            index = self.calls[out]
            self.calls[out] += 1
            self._observe((self.branch, out, index), out, value)

        return hook

    def _observe(self, key: tuple, out: _Output, value: torch.Tensor) -> None:
        step, full = self.step, self.history.setdefault(key, [])
        anchor = self.anchors.get(key)
        points = full if anchor is None else [*full, anchor]  # what the engine forecasts from (see _anchored)
        size = self.sizes[step]
        if size and _forecast_at(self.plan, out, step) and len(points) >= size:
            stats = self.stats.setdefault(step, StepStats(size))
            stats.add([v for _, v in points[-size:]], value)
            stats.steps[tuple(s for s, _ in points[-size:])] += 1
        kept = _stored_at(self.plan, out, step, self.reanchor)
        if kept == "full":
            full.append((step, value.detach().clone()))
            del full[: -self.keep]
            self.anchors.pop(key, None)
        elif kept == "anchor":
            self.anchors[key] = (step, value.detach().clone())


# ------------------------------------------------------------------------------------------------
# The public function
# ------------------------------------------------------------------------------------------------
def fit_forecast_weights(
    pipe: Any,
    plan: CachePlan,
    seeds: Sequence[int],
    conditions: Sequence[Any] | None = None,
    *,
    guidance_scale: float | None = None,
    history: int | None = None,
    ridge: float = DEFAULT_RIDGE,
    reanchor: bool = False,
    batch_size: int = 32,
) -> CachePlan:
    """``plan`` with learned forecast weights on every step that forecasts, fitted on ``pipe`` itself.

    Args:
        pipe: the pipeline (its ``transformer``; Wan 2.2's second expert is not fitted separately).
            A dual cache enabled on it is switched off while the calibration images are generated and
            enabled again afterwards with the same config.
        plan: the schedule to fit for (``plan.num_steps`` denoising steps); its steps with
            ``forecast_order >= 1`` get weights. Use seeds other than the evaluation seeds.
        seeds, conditions: the calibration images, one per (seed, condition) (conditions default to
            the pipeline's :func:`~dualcache_diffusers.bench.default_conditions`, 10 of them).
        guidance_scale: passed to the pipeline (None: its default).
        history: how many stored computations each forecast weighs (2 to 5; default: the step's
            ``forecast_order + 1``); more than ``order + 1`` lets the fit use older computations too.
        ridge: strength of the pull toward the Lagrange weights, relative to the data (0: least squares).
        reanchor: fit for an engine with ``forecast_reanchor=True`` (partial steps join the history).
        batch_size: images per pipeline call.

    Returns a new plan (format version 3 once written) whose ``metadata["forecast_fit"]`` records the
    seeds, settings and, per step, the relative error of the Taylor and of the learned forecast on
    the calibration data.
    """
    from .adapters import find_adapter
    from .api import _denoisers, enable_dual_cache, get_engine
    from .bench import Workload, default_conditions
    from .config import check_plan_fits

    sizes = _check_fit_args(plan, seeds, history, ridge, reanchor, batch_size)
    models, pipeline = _denoisers(pipe)
    if pipeline is None:
        raise TypeError("fit_forecast_weights needs the pipeline (it generates calibration images), "
                        f"not a bare {type(pipe).__name__}")
    model, adapter = models[0], find_adapter(models[0])
    check_plan_fits(plan, adapter.layout(model))
    workload = Workload(pipe, plan.num_steps, [int(s) for s in seeds],
                        list(conditions) if conditions is not None else default_conditions(pipe, 10),
                        guidance_scale=guidance_scale, batch_size=batch_size)
    engine = get_engine(pipe)
    config = engine.config if engine is not None else None
    if engine is not None:
        from .api import disable_dual_cache

        disable_dual_cache(pipe)
    stats: dict[int, StepStats] = {}
    recorder = _Recorder(model, adapter, plan, sizes, reanchor, stats)
    try:
        with torch.inference_mode():
            for start in range(0, len(workload.items), batch_size):
                recorder.new_generation()
                pipe(**workload.call_kwargs(workload.items[start : start + batch_size]))
    finally:
        recorder.remove()
        if config is not None:
            enable_dual_cache(pipe, config)
    return _with_weights(plan, stats, seeds, ridge, reanchor, history)


def _check_fit_args(plan: Any, seeds: Any, history: Any, ridge: Any, reanchor: Any, batch_size: Any) -> list[int]:
    """Per step, the number of stored computations its forecast weighs (0: it does not forecast)."""
    if not isinstance(plan, CachePlan):
        raise TypeError(f"plan must be a CachePlan, got {type(plan).__name__}")
    if plan.skips_calls:
        raise ValueError("plan skips denoiser calls (skip_call steps): fit_forecast_weights fits the forecasts of "
                         "cached module outputs, not of the denoiser's output; fit a plan without skip_call steps")
    if not plan.max_forecast_order:
        raise ValueError("plan forecasts at no step (every forecast_order is 0): there are no forecast weights to "
                         "fit; build it with forecast_order >= 1")
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not seeds:
        raise ValueError(f"seeds={seeds!r} must be a non-empty list of integer seeds")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seeds contains {seed!r}; every seed must be an integer >= 0")
    if history is not None and (isinstance(history, bool) or not isinstance(history, int)
                                or not 2 <= history <= MAX_FORECAST_ORDER + 1):
        raise ValueError(f"history={history!r} is not allowed; it must be None or an integer in "
                         f"[2, {MAX_FORECAST_ORDER + 1}]")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge={ridge!r} is not allowed; it must be a finite number >= 0")
    if not isinstance(reanchor, bool):
        raise TypeError(f"reanchor must be True or False, got {reanchor!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is not allowed; it must be an integer >= 1")
    sizes = []
    for step in plan.steps:
        order = step.forecast_order
        sizes.append(0 if not order else max(order + 1, history or 0))
    return sizes


def _with_weights(plan: CachePlan, stats: dict[int, StepStats], seeds: Sequence[int], ridge: float,
                  reanchor: bool, history: int | None) -> CachePlan:
    steps, report = [], []
    for index, step in enumerate(plan.steps):
        s = stats.get(index)
        if s is None or not s.target:
            steps.append(replace(step, forecast_weights=None))
            continue
        points = s.steps.most_common(1)[0][0]  # the history steps (the same for every output on uniform plans)
        order = step.forecast_order
        prior = [0.0] * (s.size - order - 1) + lagrange_weights(points[-(order + 1) :], index)
        weights = solve_ridge(s, prior, ridge)
        weights = tuple(float(w) for w in np.clip(weights, -MAX_FORECAST_WEIGHT, MAX_FORECAST_WEIGHT))
        check_forecast_weights(f"step {index}", weights, order)
        steps.append(replace(step, forecast_weights=weights))
        scale = math.sqrt(s.target)
        report.append({"step": index, "history_steps": list(points), "taylor": math.sqrt(s.error(prior)) / scale,
                       "learned": math.sqrt(s.error(weights)) / scale, "weights": list(weights)})
    metadata = dict(plan.metadata)
    metadata["forecast_fit"] = {"seeds": [int(x) for x in seeds], "ridge": ridge, "history": history,
                                "reanchor": reanchor, "relative_error": report}
    return CachePlan(plan.num_steps, plan.num_blocks, plan.modules, steps, method=plan.method, metadata=metadata,
                     block_modules=plan.block_modules, block_names=plan.block_names)


__all__ = ["DEFAULT_RIDGE", "StepStats", "fit_forecast_weights", "solve_ridge"]
