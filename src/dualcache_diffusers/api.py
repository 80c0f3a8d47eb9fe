"""The one-line API: enable_dual_cache / disable_dual_cache / cache_stats."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch

from .adapters import find_adapter
from .adapters.base import ModelAdapter
from .config import METHODS, DualCacheConfig, check_override_names, check_plan_fits
from .engine import DualCacheEngine
from .plan import CachePlan
from .selection import ERROR_SELECTIONS
from .stats import CacheStats

logger = logging.getLogger(__name__)

#: schedule options a ``budget`` replaces (passing one of them with a budget is an error)
BUDGET_REPLACES = ("interval", "schedule", "fresh_ratio", "ratio_schedule", "first_full_steps", "plan")

_ENGINE_ATTR = "_dualcache_engine"
#: pipeline attributes that hold denoisers (Wan 2.2 A14B has a second expert in ``transformer_2``)
DENOISER_ATTRS = ("transformer", "transformer_2")


def _denoisers(pipe_or_model: Any) -> tuple[list[torch.nn.Module], Any]:
    """The denoisers to cache and the pipeline (None for a bare transformer)."""
    if isinstance(pipe_or_model, torch.nn.Module):
        return [pipe_or_model], None
    models = [getattr(pipe_or_model, attr, None) for attr in DENOISER_ATTRS]
    models = [m for m in models if isinstance(m, torch.nn.Module)]
    if models:
        return models, pipe_or_model
    other = getattr(pipe_or_model, "unet", None) or getattr(pipe_or_model, "prior", None)
    what = type(other).__name__ if other is not None else type(pipe_or_model).__name__
    raise TypeError(
        f"pipe={type(pipe_or_model).__name__} is not supported: its denoiser is {what}, not a diffusion "
        "transformer; pass a diffusers pipeline with a `transformer` (DiT, PixArt, Wan, Flux, ...) or the transformer"
    )


def _make_config(
    config: str | DualCacheConfig | None, family: str, overrides: dict[str, Any], plan: Any
) -> DualCacheConfig:
    check_override_names(overrides)
    if overrides.get("budget") is not None:
        fixed = sorted(set(overrides) & set(BUDGET_REPLACES))
        if fixed or plan is not None:
            what = ", ".join(f"{name}=" for name in fixed) or "plan="
            raise ValueError(
                f"budget={overrides['budget']!r} builds the whole schedule (which steps are full, the fresh ratio), "
                f"so it cannot be combined with {what}...; pass either budget or the schedule options"
            )
    if plan is not None and config is not None:
        raise ValueError(
            f"pass either config={config if isinstance(config, str) else 'DualCacheConfig(...)'!r} or plan=..., "
            "not both: a plan replaces the preset's whole schedule"
        )
    if plan is not None:
        return DualCacheConfig.from_preset("duca", family, **overrides, plan=plan)
    if config is None or isinstance(config, str):
        return DualCacheConfig.from_preset(config or "duca", family, **overrides)
    if isinstance(config, DualCacheConfig):
        if config.family not in (None, family):
            raise ValueError(
                f"config is the {config.family!r} preset but this model's family is {family!r}: build it with "
                f"DualCacheConfig.from_preset(name, {family!r}) or pass the preset name"
            )
        return config.replace(**overrides)
    raise TypeError(
        f"config must be a preset name ({', '.join(map(repr, METHODS))}) or a DualCacheConfig, "
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
        pipe_or_transformer: a pipeline with a supported ``transformer`` (and ``transformer_2``, as
            Wan 2.2 A14B has: both are cached and follow the pipeline's global step), or a transformer.
        config: a preset name ("duca" by default, "toca", "fora", "full") taken with the settings
            of the model's family, or a :class:`DualCacheConfig`.
        plan: a :class:`CachePlan` or the path of a plan JSON (e.g. exported by the router trainer);
            it replaces the preset's schedule (so it cannot be combined with ``config``).
        **overrides: any :class:`DualCacheConfig` field, e.g. ``budget=3`` (3x fewer denoiser FLOPs: the
            schedule is built for that budget from the model's measured costs; see docs/methods.md),
            ``interval=4``,
            ``fresh_ratio=0.2``, ``selection="random"``, ``aggressive="reuse"``.

    Returns a copy of the effective config (changing it changes nothing; enable again to change
    settings). Everything is validated before any hook is attached, so a failed call leaves the
    pipeline as it was. Calling it again replaces the previous cache.
    """
    models, pipeline = _denoisers(pipe_or_transformer)
    adapters: list[ModelAdapter] = [find_adapter(model) for model in models]
    cfg = _make_config(config, adapters[0].family(models[0]), overrides, plan)
    layouts = [adapter.layout(model) for model, adapter in zip(models, adapters)]
    if cfg.plan is not None:  # check the plan fits every denoiser before touching anything
        for layout in layouts:
            check_plan_fits(cfg.plan, layout)
    if pipeline is None and cfg.plan is None and cfg.num_inference_steps is None:
        raise ValueError(
            f"a bare {type(models[0]).__name__} cannot tell the number of denoising steps: enable the cache on "
            "the pipeline (its scheduler tells), or pass num_inference_steps=... or plan=..."
        )
    for model in models:
        if getattr(model, _ENGINE_ATTR, None) is not None:
            logger.info("dual cache was already enabled on %s: replacing its config", type(model).__name__)
            _detach(model)
    engine = DualCacheEngine(list(zip(models, adapters)), cfg, pipeline)
    _choose_selection(engine)
    try:
        engine.attach()
    except Exception:
        engine.detach()
        raise
    for model in models:
        setattr(model, _ENGINE_ATTR, engine)
    logger.info("dual cache enabled on %s: %s", ", ".join(type(m).__name__ for m in models), cfg)
    return copy.deepcopy(cfg)


def _choose_selection(engine: DualCacheEngine) -> None:
    """Fall back to random selection where the scorer has nothing to read (fused QKV projections)."""
    cfg = engine.config
    if cfg.selection == "random":
        return
    for den in engine.denoisers:
        partial_blocks = {info.index for info in den.infos if any(m.can_partial for m in info.modules)}
        readable = {b for b, (_, attn, _) in den.value_modules.items() if not getattr(attn, "fused_projections", False)}
        missing = sorted(partial_blocks - readable)
        if missing and cfg.method != "fora" and cfg.method != "full":
            fused = any(getattr(resolve_attn, "to_qkv", None) is not None
                        for resolve_attn in den.model.modules() if hasattr(resolve_attn, "heads"))
            reason = "its QKV projections are fused (fuse_qkv_projections)" if fused else "it has no value projection"
            # forecast-error selection needs value norms only until the first error is measured
            fallback = "forecast_error" if cfg.selection in ERROR_SELECTIONS else "random"
            logger.warning(
                "dual cache: %s selection needs each block's value projection but %s blocks %s: %s; selecting "
                "tokens %s instead (call pipe.unfuse_qkv_projections() to keep %s selection)",
                cfg.selection, type(den.model).__name__, missing[:4], reason,
                "by forecast error alone (at random before it is measured)" if fallback != "random" else "at random",
                cfg.selection,
            )
            engine.fallback_selection = fallback
            return


def get_engine(pipe_or_transformer: Any) -> DualCacheEngine | None:
    models, _ = _denoisers(pipe_or_transformer)
    return getattr(models[0], _ENGINE_ATTR, None)


def _detach(model: torch.nn.Module) -> None:
    engine = getattr(model, _ENGINE_ATTR, None)
    if engine is None:
        return
    engine.detach()
    for den in engine.denoisers:
        if getattr(den.model, _ENGINE_ATTR, None) is engine:
            delattr(den.model, _ENGINE_ATTR)


def disable_dual_cache(pipe_or_transformer: Any) -> None:
    """Remove every hook and cache; the pipeline then runs exactly as stock diffusers."""
    models, _ = _denoisers(pipe_or_transformer)
    for model in models:
        _detach(model)


def reset_dual_cache(pipe_or_transformer: Any) -> None:
    """Forget this thread's caches now (needed only when calling a bare transformer by hand)."""
    engine = get_engine(pipe_or_transformer)
    if engine is not None:
        engine.reset()


def cache_stats(pipe_or_transformer: Any) -> CacheStats:
    """Statistics of the most recent generation: step kinds, tokens computed, FLOPs, cache memory."""
    engine = get_engine(pipe_or_transformer)
    if engine is None:
        raise RuntimeError("dual cache is not enabled on this pipeline; call enable_dual_cache(pipe) first")
    return engine.stats()
