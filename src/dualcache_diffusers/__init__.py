"""dualcache-diffusers: dual feature caching for stock diffusers transformer pipelines.

The public names are imported on first use (PEP 562), so that ``import dualcache_diffusers.cli`` and
``dualcache --help`` do not pay for importing torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "supported_models": "adapters",
    "cache_stats": "api",
    "disable_dual_cache": "api",
    "enable_dual_cache": "api",
    "reset_dual_cache": "api",
    "PRESETS": "config",
    "DualCacheConfig": "config",
    "DualCachePipeline": "pipeline",
    "fit_forecast_weights": "forecast_fit",
    "Action": "plan",
    "CachePlan": "plan",
    "StepPlan": "plan",
    "CacheStats": "stats",
    "count_flops": "stats",
}

__all__ = [  # names resolved on first use by __getattr__
    "PRESETS",
    "Action",
    "CachePlan",
    "CacheStats",
    "DualCacheConfig",
    "DualCachePipeline",
    "StepPlan",
    "cache_stats",
    "count_flops",
    "disable_dual_cache",
    "enable_dual_cache",
    "fit_forecast_weights",
    "reset_dual_cache",
    "supported_models",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
