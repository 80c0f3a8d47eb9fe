"""FLOPs of a cache plan from per-module costs, the same accounting the engine uses.

A :class:`PlanCost` is measured once from one probe call of the denoiser: the
:class:`~dualcache_diffusers.stats.ModuleCost` of every cached module, the rows it sees, and the
FLOPs of every Linear / Conv layer outside the cached modules (per call, and per block). A plan's
FLOPs are then summed step by step exactly as the engine counts them, so the predicted fraction
agrees with ``count_flops`` around a real pipeline call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..adapters import ModelAdapter
from ..plan import CachePlan, StepPlan, num_fresh_tokens
from ..stats import ModuleCost, layer_flops


@dataclass
class PlanCost:
    """Per-sample FLOPs of one denoiser call, split the way the engine splits it."""

    tokens: int
    overhead_model: int
    overhead_blocks: int
    module_costs: list[list[ModuleCost]]  # [block][module]
    kv_rows: list[list[int]]  # [block][module]: key/value rows (tokens for self-attention, text for cross)

    @property
    def num_blocks(self) -> int:
        return len(self.module_costs)

    def module_flops(self, block: int, module: int, fraction: float) -> int:
        rows = num_fresh_tokens(fraction, self.tokens)
        if rows == 0:
            return 0
        return self.module_costs[block][module].flops(1, rows, self.kv_rows[block][module])

    def full_call(self) -> int:
        return self.overhead_model + self.overhead_blocks + sum(
            self.module_flops(b, m, 1.0) for b in range(self.num_blocks) for m in range(len(self.module_costs[b]))
        )

    def step_flops(self, step: StepPlan) -> int:
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
            [[self.module_flops(b, m, 1.0) for m in range(len(r))] for b, r in enumerate(self.module_costs)],
            dtype=torch.float64,
        )
        part = torch.tensor(
            [[self.module_flops(b, m, partial_ratio) for m in range(len(r))] for b, r in enumerate(self.module_costs)],
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


def measure_plan_cost(
    model: torch.nn.Module, adapter: ModelAdapter, call: Any
) -> PlanCost:
    """Run ``call()`` (one denoiser call with batch 1 or more) and record the cost model.

    FLOPs are normalised per sample (divided by the batch size of the probe call).
    """
    blocks = adapter.blocks(model)
    names = adapter.module_names(model)
    cached_layers: set[int] = set()
    seen: dict[tuple[int, int], tuple[int, int, int]] = {}  # (b, m) -> (batch, tokens, kv rows)
    handles = []
    in_block: list[int | None] = [None]
    totals = {"model": 0, "blocks": 0}

    def module_pre(b: int, m: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            encoder = kwargs.get("encoder_hidden_states")
            kv = hidden.shape[1] if encoder is None else encoder.shape[1]
            seen[b, m] = (hidden.shape[0], hidden.shape[1], kv)

        return hook

    def block_pre(b: int):
        def hook(module, args, kwargs):
            in_block[0] = b

        return hook

    def block_post(module, args, kwargs, output):
        in_block[0] = None

    def layer_hook(layer, inputs, output):
        flops = layer_flops(layer, inputs, output)
        totals["model" if in_block[0] is None else "blocks"] += flops

    try:
        for b, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(block_pre(b), with_kwargs=True))
            handles.append(block.register_forward_hook(block_post, with_kwargs=True))
            for m, name in enumerate(names):
                module = getattr(block, name)
                cached_layers.update(id(x) for x in module.modules())
                handles.append(module.register_forward_pre_hook(module_pre(b, m), with_kwargs=True))
        counted = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
        for layer in model.modules():
            if isinstance(layer, counted) and id(layer) not in cached_layers:
                handles.append(layer.register_forward_hook(layer_hook))
        with torch.no_grad():
            call()
    finally:
        for h in handles:
            h.remove()
    if len(seen) != len(blocks) * len(names):
        raise RuntimeError("the probe call did not run every cached module; cannot measure the plan cost")
    batch, tokens, _ = seen[0, 0]
    costs = [[ModuleCost.of(getattr(block, name)) for name in names] for block in blocks]
    kv_rows = [[seen[b, m][2] for m in range(len(names))] for b in range(len(blocks))]
    return PlanCost(
        tokens=tokens,
        overhead_model=totals["model"] // batch,
        overhead_blocks=totals["blocks"] // batch,
        module_costs=costs,
        kv_rows=kv_rows,
    )
