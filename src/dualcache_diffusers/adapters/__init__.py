"""Model adapters: everything model-specific the engine needs, one file per model family.

Every module in this package is imported and every :class:`ModelAdapter` subclass with
``model_classes`` is registered, so adding a family is adding one file.
"""

from __future__ import annotations

import importlib
import pkgutil

import torch

from .base import BlockListSpec, ModelAdapter, ModuleSpec


def _discover() -> list[ModelAdapter]:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    found, seen = [], set()
    stack = list(ModelAdapter.__subclasses__())
    while stack:
        cls = stack.pop(0)
        stack.extend(cls.__subclasses__())
        if cls.model_classes and cls not in seen:
            seen.add(cls)
            found.append(cls())
    return found


ADAPTERS: list[ModelAdapter] = _discover()


def _register_presets() -> None:
    """Families whose adapter declares ``presets`` get them in ``config.PRESETS`` (policy stays data)."""
    from ..config import PRESETS

    for adapter in ADAPTERS:
        for family in set(adapter.model_classes.values()):
            if adapter.presets and family not in PRESETS:
                PRESETS[family] = {**PRESETS["default"], **adapter.presets}


_register_presets()


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


__all__ = ["ADAPTERS", "BlockListSpec", "ModelAdapter", "ModuleSpec", "find_adapter", "supported_models"]
