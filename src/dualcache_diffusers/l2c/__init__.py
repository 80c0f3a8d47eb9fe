"""Learning-to-Cache (Ma et al., NeurIPS 2024) and a learned dual (compute / partial / reuse) schedule.

    from dualcache_diffusers.l2c import train_router, load_published_router, plot_plan
    plan = train_router(pipe, num_inference_steps=20, budget=0.5)       # learned, exported plan
    enable_dual_cache(pipe, plan=plan)                                   # inference uses the engine

See docs/plans.md for the method, the file formats and the timestep mappings. The names below are
imported on first use, so that the command line (``l2c.cli``) starts without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "PlanCost": "costs",
    "measure_plan_cost": "costs",
    "plot_plan": "plot",
    "load_published_router": "published",
    "read_router_file": "published",
    "RouterSpec": "router",
    "TrainedRouter": "router",
    "export_dual": "router",
    "export_l2c": "router",
    "train_router": "trainer",
}

if TYPE_CHECKING:  # pragma: no cover
    from .costs import PlanCost


def plan_cost(pipe, **call_kwargs) -> PlanCost:
    """The cost model of ``pipe``'s denoiser, measured from one probe pipeline call's first denoiser call."""
    from ..adapters import find_adapter
    from .costs import measure_plan_cost
    from .data import _Recorder

    model = pipe.transformer
    adapter = find_adapter(model)
    rec = _Recorder(model, stop="call", shared=adapter.shared_inputs)
    with rec:
        pipe(**call_kwargs)
    cond, shared = rec.branch_inputs()
    hidden = rec.hidden[0][:1]
    kwargs = {"timestep": rec.timesteps[0][:1], **shared, **_slice(cond)}
    grid = adapter.token_grid(model, (hidden,), kwargs)
    return measure_plan_cost(model, adapter, lambda: model(hidden, **kwargs, return_dict=False), grid)


def _slice(tree):
    from .data import map_tree

    return map_tree(tree, lambda t: t[:1])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [  # names resolved on first use by __getattr__
    "PlanCost",
    "RouterSpec",
    "TrainedRouter",
    "export_dual",
    "export_l2c",
    "load_published_router",
    "measure_plan_cost",
    "plan_cost",
    "plot_plan",
    "read_router_file",
    "train_router",
]
