"""The one-line API: enable_dual_cache / disable_dual_cache / cache_stats."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .adapters import find_adapter
from .config import DualCacheConfig, check_override_names
from .engine import DualCacheEngine
from .plan import CachePlan
from .stats import CacheStats

logger = logging.getLogger(__name__)

_ENGINE_ATTR = "_dualcache_engine"


def _denoiser_and_scheduler(pipe_or_model: Any) -> tuple[torch.nn.Module, Any]:
    if isinstance(pipe_or_model, torch.nn.Module):
        return pipe_or_model, None
    transformer = getattr(pipe_or_model, "transformer", None)
    if isinstance(transformer, torch.nn.Module):
        return transformer, getattr(pipe_or_model, "scheduler", None)
    other = getattr(pipe_or_model, "unet", None) or getattr(pipe_or_model, "prior", None)
    what = type(other).__name__ if other is not None else type(pipe_or_model).__name__
    raise TypeError(
        f"pipe={type(pipe_or_model).__name__} is not supported: its denoiser is {what}, not a diffusion "
        "transformer; pass a diffusers pipeline with a `transformer` (DiT, PixArt, ...) or the transformer itself"
    )


def _make_config(config: str | DualCacheConfig | None, family: str, overrides: dict[str, Any]) -> DualCacheConfig:
    check_override_names(overrides)
    if config is None or isinstance(config, str):
        return DualCacheConfig.from_preset(config or "duca", family, **overrides)
    if isinstance(config, DualCacheConfig):
        return config.replace(**overrides)
    raise TypeError(
        f"config must be a preset name ('duca', 'toca', 'fora', 'full') or a DualCacheConfig, "
        f"got {type(config).__name__}"
    )


def enable_dual_cache(
    pipe_or_transformer: Any,
    config: str | DualCacheConfig | None = None,
    *,
    plan: CachePlan | str | Path | None = None,
    **overrides: Any,
) -> DualCacheConfig:
    """Turn on dual caching for a diffusers pipeline (or its transformer).

    Args:
        pipe_or_transformer: a pipeline with a supported ``transformer``, or the transformer.
        config: a preset name ("duca" by default, "toca", "fora", "full") taken with the
            published settings of the model's family, or a :class:`DualCacheConfig`.
        plan: a :class:`CachePlan` or the path of a plan JSON (e.g. exported by the router
            trainer); it replaces the preset's schedule.
        **overrides: any :class:`DualCacheConfig` field, e.g. ``interval=4``,
            ``fresh_ratio=0.2``, ``selection="random"``, ``aggressive="reuse"``.

    Returns the effective config. Everything is validated before any hook is attached, so a
    failed call leaves the pipeline as it was. Calling it again replaces the previous cache.
    """
    model, scheduler = _denoiser_and_scheduler(pipe_or_transformer)
    adapter = find_adapter(model)
    if plan is not None:
        overrides = {**overrides, "plan": plan}
    cfg = _make_config(config, adapter.family(model), overrides)
    if cfg.plan is not None:  # check the plan fits this model before touching it
        blocks, modules = len(adapter.blocks(model)), adapter.module_names(model)
        if cfg.plan.num_blocks != blocks or tuple(cfg.plan.modules) != tuple(modules):
            raise ValueError(
                f"plan is for {cfg.plan.num_blocks} blocks x {tuple(cfg.plan.modules)} but "
                f"{type(model).__name__} has {blocks} blocks x {tuple(modules)}"
            )
    if scheduler is None and cfg.plan is None and cfg.num_inference_steps is None:
        raise ValueError(
            f"a bare {type(model).__name__} cannot tell the number of denoising steps: enable the cache on the "
            "pipeline (its scheduler tells), or pass num_inference_steps=... or plan=..."
        )
    disable_dual_cache(model)
    engine = DualCacheEngine(model, adapter, cfg, scheduler)
    try:
        engine.attach()
    except Exception:
        engine.detach()
        raise
    setattr(model, _ENGINE_ATTR, engine)
    logger.info("dual cache enabled on %s: %s", type(model).__name__, cfg)
    return cfg


def get_engine(pipe_or_transformer: Any) -> DualCacheEngine | None:
    model, _ = _denoiser_and_scheduler(pipe_or_transformer)
    return getattr(model, _ENGINE_ATTR, None)


def disable_dual_cache(pipe_or_transformer: Any) -> None:
    """Remove every hook and cache; the pipeline then runs exactly as stock diffusers."""
    model, _ = _denoiser_and_scheduler(pipe_or_transformer)
    engine = getattr(model, _ENGINE_ATTR, None)
    if engine is None:
        return
    engine.detach()
    delattr(model, _ENGINE_ATTR)


def reset_dual_cache(pipe_or_transformer: Any) -> None:
    """Forget the caches now (needed only when calling a bare transformer by hand)."""
    engine = get_engine(pipe_or_transformer)
    if engine is not None:
        engine.reset()


def cache_stats(pipe_or_transformer: Any) -> CacheStats:
    """Statistics of the most recent generation: step kinds, tokens computed, FLOPs, cache memory."""
    engine = get_engine(pipe_or_transformer)
    if engine is None:
        raise RuntimeError("dual cache is not enabled on this pipeline; call enable_dual_cache(pipe) first")
    if not engine.last_stats:
        return CacheStats()
    return CacheStats.merge(list(engine.last_stats.values()))
