"""dualcache-diffusers: dual feature caching for stock diffusers transformer pipelines."""

from .adapters import supported_models
from .api import cache_stats, disable_dual_cache, enable_dual_cache, reset_dual_cache
from .config import PRESETS, DualCacheConfig
from .pipeline import DualCachePipeline
from .plan import Action, CachePlan, StepPlan
from .stats import CacheStats, count_flops

__version__ = "0.1.0"

__all__ = [
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
    "reset_dual_cache",
    "supported_models",
]
