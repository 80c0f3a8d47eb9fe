"""Routers and their export to a :class:`~dualcache_diffusers.plan.CachePlan`.

Steps are grouped in cycles of ``interval`` denoiser calls: the first call of a cycle is full (it
fills the cache), the others are *cache steps* and each has a router. L2C (Ma et al. 2024) uses
``interval=2`` (full / cache alternating) and one logit per (cache step, block, branch); the
branches are the adapter's cached modules: DiT ``attn1`` (attention) and ``ff`` (MLP); PixArt
additionally ``attn2`` (cross-attention), routed as a branch of its own.

The dual router has three logits per (cache step, block, module): compute / partial / reuse.

Both routers may train against the engine's forecast (``forecast_order=1``): what a cache step reuses (and,
dual, what a partial step does not recompute) is then extrapolated from the module's last two computations;
the exported cache steps carry the order, so the plan runs what was trained.

Models whose blocks differ (Flux's double then single stream blocks, SD3.5's ``attn2`` in some
blocks, Lumina2's refiners) keep one logit per (block, module column) of the plan; the spec records
which modules each block has (``block_modules``) and which of them may recompute rows one by one
(``block_partial``). A module a block lacks is neither trained nor exported (its plan cell is
ignored), and the partial choice of a module that cannot recompute rows has probability 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..plan import FULL, CachePlan, PlanLayout, StepPlan
from .costs import PlanCost

LEARNED = "learned"
FORECAST_ORDERS = (0, 1)
CHOICES = ("compute", "partial", "reuse")


def check_forecast_order(kind: str, forecast_order: Any) -> None:
    """Refuse a forecast order that is not one of :data:`FORECAST_ORDERS` (both routers train either)."""
    if isinstance(forecast_order, bool) or forecast_order not in FORECAST_ORDERS:
        raise ValueError(f"forecast_order={forecast_order!r} is not allowed for kind={kind!r}; allowed: 0, 1")


@dataclass
class RouterSpec:
    kind: str  # "l2c" or "dual"
    num_steps: int
    num_blocks: int
    modules: tuple[str, ...]
    interval: int = 2
    partial_ratio: float = 0.25
    #: modules of each block (None: every block has every module)
    block_modules: tuple[tuple[str, ...], ...] | None = None
    #: modules of each block that may recompute rows one by one (None: every module of every block)
    block_partial: tuple[tuple[str, ...], ...] | None = None
    #: order of the engine's forecast of what a cache step reuses (0: plain reuse, 1: linear from the module's
    #: last two computations), and for the dual router what a partial step's other rows are; the exported cache
    #: steps carry it
    forecast_order: int = 0

    def __post_init__(self) -> None:
        check_forecast_order(self.kind, self.forecast_order)
        self.modules = tuple(self.modules)
        if self.block_modules is not None:
            self.block_modules = tuple(tuple(b) for b in self.block_modules)
            if all(b == self.modules for b in self.block_modules):
                self.block_modules = None
        if self.block_partial is not None:
            self.block_partial = tuple(tuple(b) for b in self.block_partial)
            if self.block_partial == tuple(self._present(b) for b in range(self.num_blocks)):
                self.block_partial = None
        for name in ("block_modules", "block_partial"):
            value = getattr(self, name)
            if value is not None and len(value) != self.num_blocks:
                raise ValueError(f"router spec: {name} has {len(value)} entries for num_blocks={self.num_blocks}")

    @classmethod
    def from_layout(cls, kind: str, num_steps: int, layout: PlanLayout, **kwargs: Any) -> RouterSpec:
        """The spec of a router for a model of ``layout`` (``adapter.layout(model)``)."""
        partial = tuple(tuple(m for m in names if layout.can_partial(b, m))
                        for b, names in enumerate(layout.block_modules))
        return cls(kind, num_steps, layout.num_blocks, layout.modules, block_modules=layout.block_modules,
                   block_partial=partial, **kwargs)

    def _present(self, block: int) -> tuple[str, ...]:
        return self.modules if self.block_modules is None else self.block_modules[block]

    @property
    def present(self) -> torch.Tensor:
        """(blocks, modules) bool: the cells a router decides."""
        return torch.tensor([[m in self._present(b) for m in self.modules] for b in range(self.num_blocks)])

    @property
    def partial(self) -> torch.Tensor:
        """(blocks, modules) bool: the cells whose partial choice is allowed."""
        allowed = [self._present(b) if self.block_partial is None else self.block_partial[b]
                   for b in range(self.num_blocks)]
        return torch.tensor([[m in allowed[b] for m in self.modules] for b in range(self.num_blocks)])

    @property
    def full_steps(self) -> list[int]:
        return list(range(0, self.num_steps, self.interval))

    @property
    def cache_steps(self) -> list[int]:
        return [s for s in range(self.num_steps) if s % self.interval]

    @property
    def logit_shape(self) -> tuple[int, ...]:
        shape = (len(self.cache_steps), self.num_blocks, len(self.modules))
        return (*shape, 3) if self.kind == "dual" else shape

    def to_dict(self) -> dict[str, Any]:
        data = {
            "kind": self.kind, "num_steps": self.num_steps, "num_blocks": self.num_blocks,
            "modules": list(self.modules), "interval": self.interval, "partial_ratio": self.partial_ratio,
        }
        for name in ("block_modules", "block_partial"):  # left out for uniform models, as before they existed
            value = getattr(self, name)
            if value is not None:
                data[name] = [list(b) for b in value]
        if self.forecast_order:  # left out at 0, so checkpoints from before it existed resume
            data["forecast_order"] = self.forecast_order
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RouterSpec:
        return cls(**data)


def check_logits(logits: Any, shape: tuple[int, ...] | None = None, source: str = "router logits") -> torch.Tensor:
    """``logits`` if it is a non-empty, finite, real floating tensor (of ``shape`` when given), else a ValueError
    / TypeError that names ``source``."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{source}: logits must be a tensor, got {type(logits).__name__}")
    if logits.is_complex() or not logits.is_floating_point():
        raise ValueError(f"{source}: logits must be real floating-point numbers, got dtype {logits.dtype}")
    if logits.numel() == 0:
        raise ValueError(f"{source}: logits are empty (shape {tuple(logits.shape)})")
    if shape is not None and tuple(logits.shape) != tuple(shape):
        raise ValueError(f"{source}: logits have shape {tuple(logits.shape)}, expected {tuple(shape)}")
    finite = torch.isfinite(logits.detach())
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"{source}: {bad} of {logits.numel()} logits are NaN or infinite")
    return logits


def probabilities(spec: RouterSpec, logits: torch.Tensor) -> torch.Tensor:
    """L2C: sigmoid (probability of computing); dual: softmax over (compute, partial, reuse), the partial
    choice left out where the module cannot recompute rows. Cells of modules a block lacks: 0."""
    present = spec.present.to(logits.device)
    if spec.kind != "dual":
        return torch.sigmoid(logits) * present
    return torch.softmax(_masked(spec, logits), dim=-1) * present[..., None]


def _masked(spec: RouterSpec, logits: torch.Tensor) -> torch.Tensor:
    """Dual logits with the partial choice at -inf where it is not allowed."""
    blocked = torch.zeros(logits.shape[1:], dtype=torch.bool, device=logits.device)
    blocked[..., 1] = ~spec.partial.to(logits.device)
    return logits.masked_fill(blocked, -math.inf)


def expected_fraction(spec: RouterSpec, probs: torch.Tensor, cost: PlanCost) -> torch.Tensor:
    """Differentiable expected FLOPs fraction of the whole plan (full steps and overheads included)."""
    full, part = cost.tensors(spec.partial_ratio)
    full_call = float(cost.full_call())
    fixed = len(spec.full_steps) * full_call + len(spec.cache_steps) * float(cost.overhead_model + cost.overhead_blocks)
    p = probs.double()
    full, part = full.to(p.device), part.to(p.device)
    work = (p[..., 0] * full + p[..., 1] * part).sum() if spec.kind == "dual" else (p * full).sum()
    return (fixed + work) / (spec.num_steps * full_call)


def _plan(spec: RouterSpec, fractions: torch.Tensor, metadata: dict[str, Any], method: str) -> CachePlan:
    steps = []
    cache_index = {s: i for i, s in enumerate(spec.cache_steps)}
    rows_full = [[1.0] * len(spec.modules) for _ in range(spec.num_blocks)]
    for s in range(spec.num_steps):
        if s in cache_index:
            rows = [[float(f) for f in r] for r in fractions[cache_index[s]].tolist()]
            steps.append(StepPlan(LEARNED, rows, interval=spec.interval, forecast_order=spec.forecast_order))
        else:
            steps.append(StepPlan(FULL, [list(r) for r in rows_full], interval=spec.interval))
    return CachePlan(spec.num_steps, spec.num_blocks, spec.modules, steps, method=method, metadata=metadata,
                     block_modules=spec.block_modules)


def _choose_threshold(scores: torch.Tensor, fraction_of, budget: float) -> float:
    """Threshold on ``scores`` (compute where score > threshold) whose plan FLOPs fraction is nearest ``budget``."""
    values = sorted({float(v) for v in scores.flatten().tolist() if v < 1.0}, reverse=True)
    candidates = [math.inf] + [v - 1e-12 for v in values]  # each candidate adds one more score level
    best, best_err = candidates[0], math.inf
    for thr in candidates:
        err = abs(fraction_of(thr) - budget)
        if err < best_err - 1e-12:
            best, best_err = thr, err
    return best


def export_l2c(
    spec: RouterSpec,
    logits: torch.Tensor,
    cost: PlanCost | None = None,
    threshold: float | None = None,
    budget: float | None = None,
    metadata: dict[str, Any] | None = None,
) -> CachePlan:
    """Static schedule from L2C logits: a branch is computed where ``sigmoid(logit) > threshold``
    (as published, DiT threshold 0.1), or the threshold is chosen so that the plan's FLOPs fraction
    (from ``cost``) is nearest ``budget``."""
    check_logits(logits, spec.logit_shape)
    scores = torch.sigmoid(logits.detach().double())
    scores = torch.where(spec.present, scores, torch.ones_like(scores))  # absent cells: computed (ignored)
    meta = dict(metadata or {})
    if budget is not None:
        if cost is None:
            raise ValueError("budget=... needs the model's cost (PlanCost) to turn FLOPs into a threshold")

        def fraction_of(thr: float) -> float:
            return cost.plan_fraction(_plan(spec, (scores > thr).double(), {}, "l2c"))

        threshold = _choose_threshold(scores, fraction_of, budget)
        meta["budget"] = budget
    elif threshold is None:
        threshold = 0.1
    plan = _plan(spec, (scores > threshold).double(), meta, "l2c")
    plan.metadata["threshold"] = threshold if math.isfinite(threshold) else None
    if cost is not None:
        plan.metadata["flops_fraction"] = cost.plan_fraction(plan)
    return plan


def export_dual(
    spec: RouterSpec,
    logits: torch.Tensor,
    cost: PlanCost,
    budget: float,
    metadata: dict[str, Any] | None = None,
) -> CachePlan:
    """argmax of each module's (compute, partial, reuse) choice, then greedy adjustment to the budget.

    Over budget: repeatedly take the cheaper choice (compute -> partial -> reuse) that loses the
    least log-probability per FLOP saved. Under budget: upgrade the choice that gains the most
    log-probability per FLOP while staying within the budget.
    """
    check_logits(logits, spec.logit_shape)
    logp = torch.log_softmax(_masked(spec, logits.detach().double()), dim=-1)
    present = spec.present
    logp = torch.where(present[..., None], logp, torch.zeros_like(logp))  # absent cells: no preference
    choice = logp.argmax(dim=-1)  # (cache steps, blocks, modules)
    ratios = torch.tensor([1.0, spec.partial_ratio, 0.0], dtype=torch.float64)
    full_t, part_t = cost.tensors(spec.partial_ratio)
    flops_of = torch.stack([full_t, part_t, torch.zeros_like(full_t)], dim=-1)  # (blocks, modules, 3)
    total = spec.num_steps * float(cost.full_call())
    fixed = len(spec.full_steps) * float(cost.full_call()) + len(spec.cache_steps) * float(
        cost.overhead_model + cost.overhead_blocks
    )

    def fraction(ch: torch.Tensor) -> float:
        per = flops_of.expand(ch.shape[0], -1, -1, -1).gather(-1, ch.unsqueeze(-1)).squeeze(-1)
        return (fixed + float(per.sum())) / total

    current = fraction(choice)
    flat_flops = flops_of.expand(choice.shape[0], -1, -1, -1)
    blocked = ~spec.partial  # where the partial choice is not allowed, cheaper / richer skip it
    while current > budget:  # downgrade
        cheaper = (choice + 1).clamp(max=2)
        cheaper = torch.where((cheaper == 1) & blocked, torch.full_like(cheaper, 2), cheaper)
        saved = flat_flops.gather(-1, choice.unsqueeze(-1)).squeeze(-1) - flat_flops.gather(
            -1, cheaper.unsqueeze(-1)
        ).squeeze(-1)
        loss = logp.gather(-1, choice.unsqueeze(-1)).squeeze(-1) - logp.gather(-1, cheaper.unsqueeze(-1)).squeeze(-1)
        rate = torch.where(saved > 0, loss / saved.clamp(min=1), torch.full_like(loss, math.inf))
        if not torch.isfinite(rate).any():
            break
        idx = int(rate.flatten().argmin())
        choice.view(-1)[idx] = cheaper.view(-1)[idx]
        current = fraction(choice)
    while True:  # upgrade while within budget
        richer = (choice - 1).clamp(min=0)
        richer = torch.where((richer == 1) & blocked, torch.zeros_like(richer), richer)
        added = flat_flops.gather(-1, richer.unsqueeze(-1)).squeeze(-1) - flat_flops.gather(
            -1, choice.unsqueeze(-1)
        ).squeeze(-1)
        gain = logp.gather(-1, richer.unsqueeze(-1)).squeeze(-1) - logp.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
        fits = (added > 0) & (current + added / total <= budget + 1e-12)
        if not fits.any():
            break
        rate = torch.where(fits, gain / added.clamp(min=1), torch.full_like(gain, -math.inf))
        idx = int(rate.flatten().argmax())
        choice.view(-1)[idx] = richer.view(-1)[idx]
        current = fraction(choice)
    meta = {**(metadata or {}), "budget": budget}
    plan = _plan(spec, ratios[choice], meta, "learned-dual")
    plan.metadata["flops_fraction"] = cost.plan_fraction(plan)
    return plan


@dataclass
class TrainedRouter:
    """What training produced: the spec, the logits, the cost model and the loss history."""

    spec: RouterSpec
    logits: torch.Tensor
    cost: PlanCost
    metadata: dict[str, Any] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)

    def probabilities(self) -> torch.Tensor:
        return probabilities(self.spec, self.logits)

    def export(self, budget: float | None = None, threshold: float | None = None) -> CachePlan:
        if self.spec.kind == "dual":
            if budget is None:
                raise ValueError("the dual router exports to a FLOPs budget: pass budget=... in (0, 1]")
            return export_dual(self.spec, self.logits, self.cost, budget, self.metadata)
        return export_l2c(self.spec, self.logits, self.cost, threshold=threshold, budget=budget,
                          metadata=self.metadata)
