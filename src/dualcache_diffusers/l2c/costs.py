"""FLOPs of a cache plan from per-module costs, the same accounting the engine uses.

A :class:`PlanCost` is measured once from one probe call of the denoiser with
``FlopCounterMode``'s formulas, attributed per module: the FLOPs of every cached module's full
call, of each block outside its cached modules, and of the model outside its blocks. A partial
module (rows recomputed one by one) costs its full FLOPs scaled by the
:class:`~dualcache_diffusers.stats.ModuleCost` of the rows it computes (the selected image rows plus
every text row), as the engine scales them. A plan's FLOPs are then summed step by step exactly as
the engine counts them, so the predicted fraction agrees with ``count_flops`` around a real pipeline
call. Blocks of several lists with different modules (Flux's double and single stream, SD3.5's
``attn2`` in some blocks) are described by the adapter's :class:`~dualcache_diffusers.plan.PlanLayout`:
a module a block lacks costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..adapters import ModelAdapter
from ..plan import CachePlan, StepPlan, num_fresh_tokens
from ..stats import ModuleCost, flop_counter


@dataclass
class PlanCost:
    """Per-sample FLOPs of one denoiser call, split the way the engine splits it.

    ``full[b][m]`` is the FLOPs of block ``b``'s module column ``m`` computed whole (0 where the block
    lacks it); ``rows[b][m]`` its (query rows, key/value rows, image rows) and ``module_costs[b][m]``
    its :class:`ModuleCost` (None where absent); ``partial_ok[b][m]`` whether a fraction in (0, 1)
    recomputes rows (otherwise the engine computes the module whole).
    """

    tokens: int  # image tokens of the call (frames x rows x cols)
    overhead_model: int
    overhead_blocks: int
    full: list[list[int]]
    rows: list[list[tuple[int, int, int]]]
    module_costs: list[list[ModuleCost | None]]
    partial_ok: list[list[bool]]

    @property
    def num_blocks(self) -> int:
        return len(self.full)

    def module_flops(self, block: int, module: int, fraction: float) -> int:
        full = self.full[block][module]
        if fraction <= 0.0 or full == 0:
            return 0
        if fraction >= 1.0 or not self.partial_ok[block][module]:
            return full
        query, kv, image = self.rows[block][module]
        fresh = num_fresh_tokens(fraction, image)
        if fresh == 0:  # the engine returns the cache as it is
            return 0
        cost = self.module_costs[block][module]
        whole = cost.flops(1, query, kv)
        return round(full * cost.flops(1, fresh + query - image, kv) / whole) if whole else full

    def full_call(self) -> int:
        return self.overhead_model + self.overhead_blocks + sum(map(sum, self.full))

    def step_flops(self, step: StepPlan) -> int:
        if step.skip_call:
            return 0
        if step.skip_blocks:
            return self.overhead_model
        total = self.overhead_model + self.overhead_blocks
        for b, row in enumerate(step.fractions):
            for m, fraction in enumerate(row):
                total += self.module_flops(b, m, fraction)
        return total

    def plan_flops(self, plan: CachePlan) -> int:
        return sum(self.step_flops(s) for s in plan.steps)

    def plan_fraction(self, plan: CachePlan) -> float:
        """FLOPs of the plan over the FLOPs of the same number of uncached calls."""
        return self.plan_flops(plan) / (plan.num_steps * self.full_call())

    def tensors(self, partial_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(full, partial) FLOPs per [block, module] as float64 tensors, for differentiable expectations."""
        full = torch.tensor(
            [[self.module_flops(b, m, 1.0) for m in range(len(r))] for b, r in enumerate(self.full)],
            dtype=torch.float64,
        )
        part = torch.tensor(
            [[self.module_flops(b, m, partial_ratio) for m in range(len(r))] for b, r in enumerate(self.full)],
            dtype=torch.float64,
        )
        return full, part

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "overhead_model": self.overhead_model,
            "overhead_blocks": self.overhead_blocks,
            "full_call": self.full_call(),
        }


def image_rows(grid: tuple[int, int, int], axes: str) -> int:
    """Image rows a block sees for the (frames, rows, cols) token ``grid`` (``BlockListSpec.grid`` axes)."""
    frames, rows, cols = grid
    return {"all": frames * rows * cols, "space": rows * cols, "time": frames}[axes]


def _kv_rows(args: tuple, kwargs: dict) -> tuple[int, int]:
    hidden = args[0] if args else kwargs["hidden_states"]
    encoder = kwargs.get("encoder_hidden_states")
    return hidden.shape[1], hidden.shape[1] if encoder is None else encoder.shape[1]


def measure_plan_cost(
    model: torch.nn.Module, adapter: ModelAdapter, call: Any, grid: tuple[int, int, int] | None = None,
    batch: int = 1,
) -> PlanCost:
    """Run ``call()`` (one denoiser call of ``batch`` samples) and record the cost model.

    ``grid`` is the call's (frames, rows, cols) token grid (``adapter.token_grid``); without it every
    row a module sees counts as an image row. FLOPs are normalised per sample.
    """
    layout = adapter.layout(model)
    infos = adapter.block_infos(model)
    columns = {name: i for i, name in enumerate(layout.modules)}
    seen: dict[tuple[int, int], tuple[int, int]] = {}  # (b, m) -> (query rows, kv rows) of its first call
    handles = []

    def module_pre(b: int, m: int):
        def hook(module, args, kwargs):
            seen.setdefault((b, m), _kv_rows(args, kwargs))

        return hook

    try:
        for info in infos:
            for spec in info.modules:
                module = getattr(info.block, spec.name)
                handles.append(module.register_forward_pre_hook(module_pre(info.index, columns[spec.name]),
                                                                with_kwargs=True))
        counter = flop_counter()
        with torch.no_grad(), counter:
            call()
    finally:
        for h in handles:
            h.remove()
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    root = type(model).__name__
    total = counts.get("Global", 0)
    width = len(layout.modules)
    full = [[0] * width for _ in infos]
    rows = [[(0, 0, 0)] * width for _ in infos]
    module_costs: list[list[ModuleCost | None]] = [[None] * width for _ in infos]
    partial_ok = [[False] * width for _ in infos]
    in_blocks = 0
    for info in infos:
        prefix = f"{root}.{info.name}"
        in_blocks += counts.get(prefix, 0)
        for spec in info.modules:
            m = columns[spec.name]
            if (info.index, m) not in seen:
                raise RuntimeError(f"the probe call did not run {spec.name} of {info.name}; cannot measure the plan "
                                   "cost")
            query, kv = seen[info.index, m]
            image = query if grid is None else min(query, image_rows(grid, info.spec.grid))
            full[info.index][m] = counts.get(f"{prefix}.{spec.name}", 0) // batch
            rows[info.index][m] = (query, kv, image)
            module_costs[info.index][m] = ModuleCost.of(getattr(info.block, spec.name), spec.kernel)
            partial_ok[info.index][m] = spec.can_partial and spec.calls == ("image",)
    modules = sum(map(sum, full))
    if in_blocks == 0 or modules == 0:
        raise RuntimeError(f"the probe call's FLOPs could not be attributed to the blocks of {root} (module names "
                           f"seen: {sorted(counts)[:5]}...); cannot measure the plan cost")
    return PlanCost(
        tokens=grid[0] * grid[1] * grid[2] if grid is not None else rows[0][0][2],
        overhead_model=(total - in_blocks) // batch,
        overhead_blocks=max(0, in_blocks // batch - modules),
        full=full,
        rows=rows,
        module_costs=module_costs,
        partial_ok=partial_ok,
    )
