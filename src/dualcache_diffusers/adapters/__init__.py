"""Model adapters: everything model-specific the engine needs, one file per model family."""

from __future__ import annotations

import torch

from .base import ModelAdapter
from .basic_transformer import BasicTransformerAdapter

ADAPTERS: list[ModelAdapter] = [BasicTransformerAdapter()]


def supported_models() -> list[str]:
    return sorted(name for adapter in ADAPTERS for name in adapter.model_classes)


def find_adapter(model: torch.nn.Module) -> ModelAdapter:
    """The adapter for ``model``, or a TypeError naming what is supported."""
    for adapter in ADAPTERS:
        if adapter.supports(model):
            return adapter
    raise TypeError(
        f"model={type(model).__name__} has no dual-cache adapter; supported denoisers: "
        f"{', '.join(supported_models())}"
    )


__all__ = ["ADAPTERS", "ModelAdapter", "find_adapter", "supported_models"]
