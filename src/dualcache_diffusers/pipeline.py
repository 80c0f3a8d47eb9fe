"""DualCachePipeline: load any supported pipeline with diffusers' own loader, caching on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline

from .adapters import supported_models
from .api import enable_dual_cache
from .config import METHODS, DualCacheConfig


class DualCachePipeline:
    """``DualCachePipeline.from_pretrained(repo_or_dir, cache="duca")`` returns the stock pipeline
    (DiTPipeline, PixArtSigmaPipeline, ... as named in ``model_index.json``) with caching enabled."""

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        cache: str | DualCacheConfig | None = "duca",
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> DiffusionPipeline:
        """Args:
        pretrained_model_name_or_path: a Hub repo id or a local pipeline directory.
        cache: preset name, a DualCacheConfig, or None to load without caching.
        cache_options: overrides for the cache config (``interval``, ``fresh_ratio``, ...).
        **kwargs: passed to ``DiffusionPipeline.from_pretrained`` (torch_dtype, variant, ...).
        """
        if isinstance(cache, str) and cache not in METHODS:
            raise ValueError(f"cache={cache!r} is not supported; allowed: {', '.join(map(repr, METHODS))} or None")
        _check_transformer_class(pretrained_model_name_or_path, kwargs)
        pipe = DiffusionPipeline.from_pretrained(pretrained_model_name_or_path, **kwargs)
        if cache is not None:
            enable_dual_cache(pipe, cache, **(cache_options or {}))
        return pipe


def _check_transformer_class(path: str | Path, kwargs: dict[str, Any]) -> None:
    """Fail before loading weights when model_index.json names no supported transformer.

    The check reads only a local directory or the local Hub cache (``local_files_only=True``): it never goes
    to the network, so a Hub id that is not cached costs nothing here and diffusers' own loader reports it
    (at once when offline) exactly as stock diffusers does."""
    try:
        index = DiffusionPipeline.load_config(path, cache_dir=kwargs.get("cache_dir"), local_files_only=True)
    except Exception:  # not cached / unreadable: let diffusers' own loader report it
        return
    entry = index.get("transformer")
    if kwargs.get("transformer") is not None:
        return
    if not entry or entry[1] is None:
        denoiser = index.get("unet", [None, None])[1] or "none"
        raise TypeError(
            f"{index.get('_class_name')} at {str(path)!r} has no transformer (denoiser: {denoiser}); "
            f"supported transformers: {', '.join(supported_models())}"
        )
    if entry[1] not in supported_models():
        raise TypeError(
            f"{index.get('_class_name')} at {str(path)!r} uses transformer {entry[1]}, which has no dual-cache "
            f"adapter; supported: {', '.join(supported_models())}"
        )
