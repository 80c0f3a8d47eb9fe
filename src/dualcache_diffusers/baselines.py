"""Competitor caches ("baselines") applied to stock `DiTPipeline` and `PixArtAlphaPipeline` / `PixArtSigmaPipeline`.

Two families are wrapped:

* diffusers' own caches from `diffusers.hooks`: FirstBlockCache, TaylorSeer, MagCache, Pyramid Attention Broadcast,
  FasterCache and SeaCache. They are stateful hooks that read a `CacheContext`, which only `CacheMixin` pipelines set
  (via `transformer.cache_context(...)`); `DiTTransformer2DModel` / `PixArtTransformer2DModel` are not `CacheMixin`
  and their pipelines never set one. We therefore apply the stock `apply_*` functions to the transformer and register
  one extra, outermost `ModelHook` on it (`_CacheContextHook`) that, on every transformer call, enters
  `CacheMixin.cache_context` (step index, step count, timestep, sigma) and remembers the current timestep for the
  `current_timestep_callback` of PAB / FasterCache. It resets all stateful hooks when a new generation starts, which
  it detects because the pipeline's `scheduler.set_timesteps` replaced `scheduler.timesteps` by a new tensor (or
  because the step counter reached the step count, for callers that drive the transformer directly).
* cache-dit's DBCache (optional, `pip install cache-dit`), through `cache_dit.enable_cache(pipe, ...)`, alone or with
  cache-dit's TaylorSeer or FoCa calibrator forecasting the skipped blocks' residual.

Usage::

    handle = apply_baseline(pipe, "fbcache", threshold=0.1)
    images = pipe(...).images
    remove_baseline(pipe, handle)  # the pipeline is exactly as before

Every baseline has one `sweep_knob` (see `BASELINES[name]`) that trades compute for fidelity, so a benchmark can
sweep it to hit a compute budget. Only one baseline can be active on a pipeline at a time.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from diffusers import DiffusionPipeline, DiTPipeline
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    ModelHook,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    apply_faster_cache,
    apply_first_block_cache,
    apply_mag_cache,
    apply_pyramid_attention_broadcast,
    apply_taylorseer_cache,
)
from diffusers.models.cache_utils import CacheMixin
from torch import nn

try:  # SeaCache is new in diffusers 0.42; keep the module importable without it.
    from diffusers.hooks import SeaCacheConfig, apply_sea_cache
except ImportError:  # pragma: no cover - depends on the installed diffusers
    SeaCacheConfig = None
    apply_sea_cache = None

__all__ = [
    "BASELINES",
    "BaselineHandle",
    "BaselineSpec",
    "apply_baseline",
    "available_baselines",
    "calibrate_mag_ratios",
    "remove_baseline",
]

_CONTEXT_HOOK = "dualcache_baseline_cache_context"
_CONTEXT_NAME = "denoiser"
# Transformers (by identity) that currently carry a baseline, to refuse stacking two.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()

Undo = Callable[[], None]


# --------------------------------------------------------------------------------------------------------------------
# Public registry types
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaselineSpec:
    """One competitor cache.

    `sweep_knob` is the knob that trades compute for fidelity; moving it in the `faster_when` direction skips more
    transformer compute. `defaults` lists every accepted knob with its default value.
    """

    name: str
    summary: str
    sweep_knob: str
    faster_when: Literal["higher", "lower"]
    defaults: Mapping[str, Any]
    apply: Callable[[DiffusionPipeline, dict[str, Any]], list[Undo]] = field(repr=False)
    requires: str | None = None  # optional package that must be importable

    def is_available(self) -> bool:
        # find_spec, not import: importing cache-dit takes seconds, and only applying it needs the import.
        return self.requires is None or importlib.util.find_spec(self.requires) is not None


@dataclass
class BaselineHandle:
    """What `apply_baseline` returns; pass it to `remove_baseline` to undo everything it did."""

    name: str
    knobs: dict[str, Any]
    _transformer: nn.Module = field(repr=False)
    _undo: list[Undo] = field(repr=False)
    removed: bool = False


# --------------------------------------------------------------------------------------------------------------------
# Cache context for diffusers' hooks
# --------------------------------------------------------------------------------------------------------------------


def _timestep_of_call(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
    """The `timestep` argument of a transformer call as a float (first element of a batched tensor)."""
    timestep = kwargs.get("timestep")
    if timestep is None:
        try:
            bound = inspect.signature(type(module).forward).bind_partial(module, *args, **kwargs)
        except TypeError:
            return None
        timestep = bound.arguments.get("timestep")
    if isinstance(timestep, torch.Tensor):
        return float(timestep.flatten()[0].item()) if timestep.numel() else None
    return None if timestep is None else float(timestep)


def _flow_sigma(scheduler: Any, timestep: float | None) -> float | None:
    """The noise level of `timestep` as a flow-matching sigma in [0, 1] (what SeaCache's spectral prior expects).

    For variance-preserving schedulers `x_t = sqrt(a) x_0 + sqrt(1 - a) eps`; the flow sigma with the same
    noise-to-signal ratio is `sqrt(1 - a) / (sqrt(a) + sqrt(1 - a))`. Flow-matching schedulers use `t = 1000 * sigma`.
    """
    if timestep is None:
        return None
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if isinstance(alphas_cumprod, torch.Tensor):
        index = min(max(round(timestep), 0), len(alphas_cumprod) - 1)
        alpha = float(alphas_cumprod[index])
        return math.sqrt(1.0 - alpha) / (math.sqrt(alpha) + math.sqrt(1.0 - alpha))
    num_train_timesteps = getattr(getattr(scheduler, "config", None), "num_train_timesteps", 1000)
    return min(max(timestep / num_train_timesteps, 0.0), 1.0)


def _swap_batch_halves(value: Any, batch_size: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch_size:
        first, second = value.chunk(2, dim=0)
        return torch.cat([second, first], dim=0)
    return value


class _CacheContextHook(ModelHook):
    """Outermost hook on the transformer: gives diffusers' cache hooks the context a `CacheMixin` pipeline would.

    Per call it (1) detects a new generation and resets every stateful hook under the transformer, (2) records the
    current timestep for `current_timestep_callback`, and (3) runs the wrapped forward inside
    `CacheMixin.cache_context` with the step index, step count, timestep and sigma. DiT/PixArt batch both
    classifier-free-guidance branches into one call, so each call is one denoising step of one trajectory.

    With `swap_cfg_halves=True` (DiT, whose guidance batch is `[cond, uncond]`) it presents the batch to the inner
    hooks as `[uncond, cond]` (FasterCache's convention) and swaps the output back.
    """

    def __init__(self, pipe: DiffusionPipeline, swap_cfg_halves: bool = False) -> None:
        super().__init__()
        self._pipe_ref = weakref.ref(pipe)
        self.swap_cfg_halves = swap_cfg_halves
        self.step_index = 0
        self.num_inference_steps: int | None = None
        self.timestep: float | None = None
        self._timesteps_seen: torch.Tensor | None = None
        self._started = False

    def current_timestep(self) -> float:
        """For `current_timestep_callback`: the timestep of the transformer call in progress."""
        return -1.0 if self.timestep is None else self.timestep

    def _maybe_start_generation(self, module: nn.Module) -> None:
        pipe = self._pipe_ref()
        scheduler = getattr(pipe, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        new_schedule = not self._started or timesteps is not self._timesteps_seen
        finished = self.num_inference_steps is not None and self.step_index >= self.num_inference_steps
        if not new_schedule and not finished:
            return
        HookRegistry.check_if_exists_or_initialize(module).reset_stateful_hooks(recurse=True)
        self._started = True
        self._timesteps_seen = timesteps
        self.num_inference_steps = len(timesteps) if timesteps is not None else None
        self.step_index = 0

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        self._maybe_start_generation(module)
        self.timestep = _timestep_of_call(module, args, kwargs)
        scheduler = getattr(self._pipe_ref(), "scheduler", None)
        num_steps = self.num_inference_steps
        step_index = self.step_index if num_steps is None else min(self.step_index, num_steps - 1)

        batch_size = None
        if self.swap_cfg_halves:
            hidden_states = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden_states, torch.Tensor) and hidden_states.shape[0] % 2 == 0:
                batch_size = hidden_states.shape[0]
                args = tuple(_swap_batch_halves(a, batch_size) for a in args)
                kwargs = {k: _swap_batch_halves(v, batch_size) for k, v in kwargs.items()}

        with CacheMixin.cache_context(
            module,
            _CONTEXT_NAME,
            step_index=step_index,
            num_inference_steps=num_steps,
            timestep=self.timestep,
            sigma=_flow_sigma(scheduler, self.timestep),
        ):
            output = self.fn_ref.original_forward(*args, **kwargs)
        self.step_index += 1

        if batch_size is not None:
            if isinstance(output, torch.Tensor):
                output = _swap_batch_halves(output, batch_size)
            elif isinstance(output, tuple):
                output = (_swap_batch_halves(output[0], batch_size), *output[1:])
            else:  # Transformer2DModelOutput
                output.sample = _swap_batch_halves(output.sample, batch_size)
        return output


def _hook_inventory(root: nn.Module) -> dict[nn.Module, tuple[bool, bool, list[str]]]:
    """Per module: (had a hook registry, had an instance `forward`, names of its hooks)."""
    inventory = {}
    for module in root.modules():
        registry = vars(module).get("_diffusers_hook")
        names = list(registry.hooks) if registry is not None else []
        inventory[module] = (registry is not None, "forward" in vars(module), names)
    return inventory


def _remove_hooks_added_since(
    root: nn.Module, inventory: dict[nn.Module, tuple[bool, bool, list[str]]]
) -> None:
    """Remove every diffusers hook registered under `root` after `inventory` was taken, and the traces they left."""
    for module in root.modules():
        registry = vars(module).get("_diffusers_hook")
        if registry is None:
            continue
        had_registry, had_forward, old_names = inventory.get(module, (False, False, []))
        for name in reversed(list(registry.hooks)):
            if name not in old_names:
                registry.remove_hook(name, recurse=False)
        if not had_registry and not registry.hooks:
            del module._diffusers_hook
            if not had_forward:
                vars(module).pop("forward", None)
    root_registry = vars(root).get("_diffusers_hook")
    if root_registry is not None:
        root_registry.invalidate_child_registries_cache()


def _apply_with_context(
    pipe: DiffusionPipeline,
    apply_fn: Callable[[nn.Module, _CacheContextHook], None],
    swap_cfg_halves: bool = False,
) -> list[Undo]:
    """Run `apply_fn(transformer, context_hook)` (which applies diffusers cache hooks), then add the context hook."""
    transformer = pipe.transformer
    inventory = _hook_inventory(transformer)
    context_hook = _CacheContextHook(pipe, swap_cfg_halves=swap_cfg_halves)
    try:
        apply_fn(transformer, context_hook)
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        registry.register_hook(context_hook, _CONTEXT_HOOK)  # last registered = outermost
        registry.invalidate_child_registries_cache()
    except Exception:
        _remove_hooks_added_since(transformer, inventory)
        raise
    return [lambda: _remove_hooks_added_since(transformer, inventory)]


# --------------------------------------------------------------------------------------------------------------------
# diffusers caches
# --------------------------------------------------------------------------------------------------------------------


def _apply_fbcache(pipe: DiffusionPipeline, knobs: dict[str, Any]) -> list[Undo]:
    config = FirstBlockCacheConfig(threshold=knobs["threshold"])
    return _apply_with_context(pipe, lambda transformer, _: apply_first_block_cache(transformer, config))


def _apply_taylorseer(pipe: DiffusionPipeline, knobs: dict[str, Any]) -> list[Undo]:
    def apply(transformer: nn.Module, _: _CacheContextHook) -> None:
        config = TaylorSeerCacheConfig(
            cache_interval=knobs["cache_interval"],
            max_order=knobs["max_order"],
            disable_cache_before_step=knobs["disable_cache_before_step"],
            disable_cache_after_step=knobs["disable_cache_after_step"],
            # bf16 factors (diffusers' default) would dominate the error of a fp32 model.
            taylor_factors_dtype=knobs["taylor_factors_dtype"] or transformer.dtype,
            cache_identifiers=list(knobs["cache_identifiers"]),
        )
        apply_taylorseer_cache(transformer, config)

    return _apply_with_context(pipe, apply)


def _apply_magcache(pipe: DiffusionPipeline, knobs: dict[str, Any]) -> list[Undo]:
    mag_ratios = knobs["mag_ratios"]
    if mag_ratios is None:
        raise ValueError(
            "magcache needs model-specific `mag_ratios`: get them with "
            "`calibrate_mag_ratios(pipe, **same_call_kwargs_as_the_benchmark)` and pass `mag_ratios=...`."
        )
    config = MagCacheConfig(
        threshold=knobs["threshold"],
        max_skip_steps=knobs["max_skip_steps"],
        retention_ratio=knobs["retention_ratio"],
        num_inference_steps=knobs["num_inference_steps"] or len(mag_ratios),
        mag_ratios=torch.as_tensor(mag_ratios, dtype=torch.float32),
    )
    return _apply_with_context(pipe, lambda transformer, _: apply_mag_cache(transformer, config))


def _apply_pab(pipe: DiffusionPipeline, knobs: dict[str, Any]) -> list[Undo]:
    spatial = knobs["spatial_skip_range"]
    cross = knobs["cross_skip_range"] if knobs["cross_skip_range"] is not None else spatial
    timestep_range = tuple(knobs["timestep_skip_range"])

    def apply(transformer: nn.Module, context: _CacheContextHook) -> None:
        config = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=spatial,
            cross_attention_block_skip_range=cross,
            spatial_attention_timestep_skip_range=timestep_range,
            cross_attention_timestep_skip_range=timestep_range,
            current_timestep_callback=context.current_timestep,
        )
        apply_pyramid_attention_broadcast(transformer, config)

    return _apply_with_context(pipe, apply)


def _keep_cond_half_of_added_conditions(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Pre-hook for PixArt's `adaln_single`: FasterCache drops the unconditional half of the batch but cannot split
    the tensors inside the `added_cond_kwargs` dict (resolution / aspect ratio of PixArt-Alpha 1024); do it here."""
    batch_size = kwargs.get("batch_size")
    added = args[1] if len(args) > 1 else kwargs.get("added_cond_kwargs")
    if not isinstance(added, dict) or batch_size is None:
        return None
    halved = {
        key: value[-batch_size:]
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == 2 * batch_size
        else value
        for key, value in added.items()
    }
    if len(args) > 1:
        return (args[0], halved, *args[2:]), kwargs
    return args, {**kwargs, "added_cond_kwargs": halved}


def _apply_fastercache(pipe: DiffusionPipeline, knobs: dict[str, Any]) -> list[Undo]:
    is_dit = isinstance(pipe, DiTPipeline)
    weight = knobs["attention_weight"]
    undo: list[Undo] = []

    def apply(transformer: nn.Module, context: _CacheContextHook) -> None:
        config = FasterCacheConfig(
            spatial_attention_block_skip_range=knobs["spatial_skip_range"],
            spatial_attention_timestep_skip_range=tuple(knobs["spatial_timestep_skip_range"]),
            unconditional_batch_skip_range=knobs["uncond_skip_range"],
            unconditional_batch_timestep_skip_range=tuple(knobs["uncond_timestep_skip_range"]),
            alpha_low_frequency=knobs["alpha_low_frequency"],
            alpha_high_frequency=knobs["alpha_high_frequency"],
            attention_weight_callback=lambda _module: weight,
            current_timestep_callback=context.current_timestep,
            tensor_format="BCHW",
            _unconditional_conditional_input_kwargs_identifiers=[
                "hidden_states",
                "encoder_hidden_states",
                "timestep",
                "attention_mask",
                "encoder_attention_mask",
                "class_labels",  # DiT's condition
            ],
        )
        apply_faster_cache(transformer, config)
        adaln_single = getattr(transformer, "adaln_single", None)
        if getattr(transformer, "use_additional_conditions", False) and adaln_single is not None:
            handle = adaln_single.register_forward_pre_hook(
                _keep_cond_half_of_added_conditions, with_kwargs=True
            )
            undo.append(handle.remove)

    return _apply_with_context(pipe, apply, swap_cfg_halves=is_dit) + undo


def _image_latents_as_video(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[torch.Tensor]:
    """SeaCache `raw_vision_callback` for image transformers: each latent `(C, H, W)` as a 1-frame `(C, 1, H, W)`."""
    hidden_states = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 4:
        return []
    return [latent.unsqueeze(1) for latent in hidden_states.unbind(0)]


def _apply_seacache(pipe: DiffusionPipeline, knobs: dict[str, Any]) -> list[Undo]:
    if SeaCacheConfig is None or apply_sea_cache is None:
        raise ValueError(
            "seacache needs a diffusers version with `diffusers.hooks.SeaCacheConfig` (>= 0.42)."
        )
    config = SeaCacheConfig(
        threshold=knobs["threshold"],
        residual_order=knobs["residual_order"],
        retention_steps=knobs["retention_steps"],
        cache_end_steps=knobs["cache_end_steps"],
        max_consecutive_cached=knobs["max_consecutive_cached"],
        power_exp=knobs["power_exp"],
        raw_vision_callback=_image_latents_as_video,
    )
    return _apply_with_context(pipe, lambda transformer, _: apply_sea_cache(transformer, config))


# --------------------------------------------------------------------------------------------------------------------
# cache-dit
# --------------------------------------------------------------------------------------------------------------------


#: what cache-dit's DBCache forecasts the skipped blocks' residual with: nothing (it reuses the last one), its
#: TaylorSeer calibrator (order ``taylorseer_order``) or its FoCa calibrator (BDF2 predictor, Heun corrector)
DBCACHE_CALIBRATORS = ("none", "taylorseer", "foca")


def _apply_cachedit_dbcache(pipe: DiffusionPipeline, knobs: dict[str, Any]) -> list[Undo]:
    """cache-dit's DBCache through `cache_dit.enable_cache(pipe, ...)`.

    cache-dit patches more than hooks, and `cache_dit.disable_cache` does not undo all of it: it replaces
    `pipe.__class__.__call__` (class level, so all pipelines of that class enter its context while it is active),
    and for DiT its `DiTPatchFunctor` replaces `transformer.forward` and registers `transformer._norm1_emb` as a
    submodule, both of which outlive `disable_cache`. We snapshot and restore those.
    """
    calibrator = knobs["calibrator"]
    if calibrator not in DBCACHE_CALIBRATORS:
        allowed = ", ".join(map(repr, DBCACHE_CALIBRATORS))
        raise ValueError(f"calibrator={calibrator!r} is not one of cache-dit's DBCache calibrators: {allowed}")
    try:
        import cache_dit
        from cache_dit import DBCacheConfig
        from cache_dit.caching.cache_contexts.calibrators import FoCaCalibratorConfig, TaylorSeerCalibratorConfig
    except ImportError as error:
        raise ImportError("cachedit_dbcache needs cache-dit: `pip install cache-dit`.") from error

    pipe_cls = type(pipe)
    if "_original_call" in vars(pipe_cls):
        raise ValueError(f"cache-dit is already active on another {pipe_cls.__name__}; remove it first.")
    transformer = pipe.transformer
    blocks = transformer.transformer_blocks
    saved = {obj: (dict(vars(obj)), dict(obj._modules)) for obj in (transformer, blocks)}
    saved_pipe_keys = set(vars(pipe))
    saved_cls = {
        key: vars(pipe_cls)[key]
        for key in ("__call__", "_original_call", "_is_cached")
        if key in vars(pipe_cls)
    }

    calibrator_config = None
    if calibrator == "taylorseer":
        calibrator_config = TaylorSeerCalibratorConfig(taylorseer_order=knobs["taylorseer_order"])
    elif calibrator == "foca":
        calibrator_config = FoCaCalibratorConfig()
    cache_dit.enable_cache(
        pipe,
        cache_config=DBCacheConfig(
            Fn_compute_blocks=knobs["Fn_compute_blocks"],
            Bn_compute_blocks=knobs["Bn_compute_blocks"],
            residual_diff_threshold=knobs["residual_diff_threshold"],
            max_warmup_steps=knobs["max_warmup_steps"],
            warmup_interval=knobs["warmup_interval"],
            max_cached_steps=knobs["max_cached_steps"],
            max_continuous_cached_steps=knobs["max_continuous_cached_steps"],
            num_inference_steps=knobs["num_inference_steps"],
        ),
        calibrator_config=calibrator_config,
    )

    def undo() -> None:
        cache_dit.disable_cache(pipe)
        for obj, (old_vars, old_modules) in saved.items():
            for key in set(vars(obj)) - set(old_vars):
                delattr(obj, key)
            for key in set(obj._modules) - set(old_modules):
                del obj._modules[key]
            if "forward" in old_vars:
                obj.forward = old_vars["forward"]
        for key in set(vars(pipe)) - saved_pipe_keys:
            delattr(pipe, key)
        for key in ("__call__", "_original_call", "_is_cached"):
            if key in saved_cls:
                setattr(pipe_cls, key, saved_cls[key])
            elif key in vars(pipe_cls):
                delattr(pipe_cls, key)

    return [undo]


# --------------------------------------------------------------------------------------------------------------------
# Registry and public API
# --------------------------------------------------------------------------------------------------------------------


_DBCACHE_FORECAST = {
    "none": "reusing their last residual",
    "taylorseer": "forecasting their residual with cache-dit's TaylorSeer calibrator (order `taylorseer_order`)",
    "foca": "forecasting their residual with cache-dit's FoCa calibrator (BDF2 predictor, Heun corrector)",
}


def _dbcache_spec(calibrator: str) -> BaselineSpec:
    """cache-dit's DBCache with one of its calibrators (``cachedit_dbcache``, ``cachedit_dbcache_taylorseer``, ...)."""
    return BaselineSpec(
        name="cachedit_dbcache" + ("" if calibrator == "none" else "_" + calibrator),
        summary="cache-dit DBCache (F<n>B<m>): always compute the first `Fn_compute_blocks` and last "
        "`Bn_compute_blocks` blocks; skip the middle ones while the Fn output residual changed less than "
        f"`residual_diff_threshold`, {_DBCACHE_FORECAST[calibrator]}.",
        sweep_knob="residual_diff_threshold",
        faster_when="higher",
        defaults={
            "residual_diff_threshold": 0.08,
            "Fn_compute_blocks": 1,
            "Bn_compute_blocks": 0,
            "max_warmup_steps": 8,
            "warmup_interval": 1,
            "max_cached_steps": -1,
            "max_continuous_cached_steps": -1,
            "num_inference_steps": None,
            "calibrator": calibrator,
            "taylorseer_order": 1,
        },
        apply=_apply_cachedit_dbcache,
        requires="cache_dit",
    )


_SPECS = [
    BaselineSpec(
        name="fbcache",
        summary="diffusers FirstBlockCache: skip all blocks after the first when the first block's residual changed "
        "less than `threshold` (relative L1) since the last full step; reuse the cached tail residual.",
        sweep_knob="threshold",
        faster_when="higher",
        defaults={"threshold": 0.05},
        apply=_apply_fbcache,
    ),
    BaselineSpec(
        name="taylorseer",
        summary="diffusers TaylorSeer: compute attention/MLP outputs every `cache_interval` steps, predict them in "
        "between with a Taylor expansion of order `max_order` over steps.",
        sweep_knob="cache_interval",
        faster_when="higher",
        defaults={
            "cache_interval": 5,
            "max_order": 1,
            "disable_cache_before_step": 3,
            "disable_cache_after_step": None,
            "taylor_factors_dtype": None,  # None: the transformer's dtype
            # diffusers' default patterns expect modules named `attn`; BasicTransformerBlock has attn1/attn2/ff.
            "cache_identifiers": (r"transformer_blocks\.\d+\.(attn1|attn2|ff)",),
        },
        apply=_apply_taylorseer,
    ),
    BaselineSpec(
        name="magcache",
        summary="diffusers MagCache: skip the block stack (reuse the last residual) while the accumulated error "
        "predicted from calibrated residual-magnitude ratios stays below `threshold`. Needs `mag_ratios` from "
        "`calibrate_mag_ratios`.",
        sweep_knob="threshold",
        faster_when="higher",
        defaults={
            "threshold": 0.06,
            "max_skip_steps": 3,
            "retention_ratio": 0.2,
            "mag_ratios": None,
            "num_inference_steps": None,  # None: len(mag_ratios)
        },
        apply=_apply_magcache,
    ),
    BaselineSpec(
        name="pab",
        summary="diffusers Pyramid Attention Broadcast: inside `timestep_skip_range`, recompute self-attention "
        "every `spatial_skip_range` steps and cross-attention every `cross_skip_range` steps, reuse otherwise.",
        sweep_knob="spatial_skip_range",
        faster_when="higher",
        defaults={
            "spatial_skip_range": 2,
            "cross_skip_range": None,  # None: same as spatial_skip_range
            "timestep_skip_range": (100, 800),
        },
        apply=_apply_pab,
    ),
    BaselineSpec(
        name="fastercache",
        summary="diffusers FasterCache: reuse/extrapolate self-attention every `spatial_skip_range` steps and skip "
        "the unconditional CFG branch (rebuilt from frequency-domain deltas) except every `uncond_skip_range` "
        "steps. Needs classifier-free guidance (guidance_scale > 1).",
        sweep_knob="uncond_skip_range",
        faster_when="higher",
        defaults={
            "spatial_skip_range": 2,
            "spatial_timestep_skip_range": (-1, 681),
            "uncond_skip_range": 5,
            "uncond_timestep_skip_range": (-1, 641),
            "alpha_low_frequency": 1.1,
            "alpha_high_frequency": 1.1,
            "attention_weight": 0.5,
        },
        apply=_apply_fastercache,
    ),
    BaselineSpec(
        name="seacache",
        summary="diffusers SeaCache: skip the block stack (extrapolate the residual) while the accumulated change "
        "of a spectrally filtered input latent stays below `threshold`.",
        sweep_knob="threshold",
        faster_when="higher",
        defaults={
            "threshold": 0.25,
            "residual_order": 1,
            "retention_steps": 1,
            "cache_end_steps": 1,
            "max_consecutive_cached": 2,
            "power_exp": 3.0,
        },
        apply=_apply_seacache,
    ),
    *(_dbcache_spec(calibrator) for calibrator in DBCACHE_CALIBRATORS),
]

if SeaCacheConfig is None:  # pragma: no cover - depends on the installed diffusers
    _SPECS = [spec for spec in _SPECS if spec.name != "seacache"]

BASELINES: dict[str, BaselineSpec] = {spec.name: spec for spec in _SPECS}


def available_baselines() -> list[str]:
    """Names of the baselines whose optional dependencies are installed."""
    return [name for name, spec in BASELINES.items() if spec.is_available()]


def apply_baseline(pipe: DiffusionPipeline, name: str, **knobs: Any) -> BaselineHandle:
    """Apply competitor cache `name` (a key of `BASELINES`) to `pipe.transformer`; unknown knobs raise ValueError."""
    if name not in BASELINES:
        raise ValueError(f"Unknown baseline {name!r}; allowed: {', '.join(BASELINES)}.")
    spec = BASELINES[name]
    unknown = set(knobs) - set(spec.defaults)
    if unknown:
        raise ValueError(
            f"Unknown knob(s) {sorted(unknown)} for baseline {name!r}; allowed: {', '.join(spec.defaults)}."
        )
    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, nn.Module):
        raise TypeError(
            f"{type(pipe).__name__} has no `transformer`; baselines target transformer pipelines."
        )
    if transformer in _ACTIVE:
        raise ValueError(
            f"Baseline {_ACTIVE[transformer]!r} is already applied to this pipeline; remove it first."
        )
    if not spec.is_available():
        raise ImportError(f"Baseline {name!r} needs the optional package {spec.requires!r}.")

    resolved = {**spec.defaults, **knobs}
    undo = spec.apply(pipe, resolved)
    _ACTIVE[transformer] = name
    return BaselineHandle(name=name, knobs=resolved, _transformer=transformer, _undo=undo)


def remove_baseline(pipe: DiffusionPipeline, handle: BaselineHandle) -> None:
    """Undo `apply_baseline`: afterwards `pipe` computes exactly what it computed before."""
    if handle.removed:
        return
    if getattr(pipe, "transformer", None) is not handle._transformer:
        raise ValueError(
            "This handle was returned for a different pipeline (or its transformer was replaced)."
        )
    for undo in reversed(handle._undo):
        undo()
    _ACTIVE.pop(handle._transformer, None)
    handle.removed = True


def _blocks(transformer: nn.Module) -> Sequence[nn.Module]:
    blocks = getattr(transformer, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"{type(transformer).__name__} has no `transformer_blocks`.")
    return blocks


def calibrate_mag_ratios(pipe: DiffusionPipeline, **call_kwargs: Any) -> list[float]:
    """Run `pipe(**call_kwargs)` once uncached and return MagCache's `mag_ratios` for that schedule.

    Same formula as diffusers' `MagCacheConfig(calibrate=True)`: for each transformer call, the mean over tokens of
    `|r_t| / |r_{t-1}|` with `r` the residual of the block stack (last block output minus first block input);
    1.0 for the first call. Use the same step count / guidance / resolution as the run being accelerated.
    """
    blocks = _blocks(pipe.transformer)
    stack_input: list[torch.Tensor] = []
    previous: list[torch.Tensor] = []
    ratios: list[float] = []

    def before_first(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        stack_input[:] = [args[0] if args else kwargs["hidden_states"]]

    def after_last(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        hidden_states = output[0] if isinstance(output, tuple) else output
        residual = (hidden_states - stack_input[0]).float()
        if previous:
            norm = torch.linalg.norm(residual, dim=-1)
            previous_norm = torch.linalg.norm(previous[0], dim=-1)
            ratios.append((norm / (previous_norm + 1e-8)).mean().item())
        else:
            ratios.append(1.0)
        previous[:] = [residual]

    handles = [
        blocks[0].register_forward_pre_hook(before_first, with_kwargs=True),
        blocks[-1].register_forward_hook(after_last, with_kwargs=True),
    ]
    try:
        pipe(**call_kwargs)
    finally:
        for hook_handle in handles:
            hook_handle.remove()
    return ratios
