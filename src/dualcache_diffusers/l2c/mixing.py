"""Training-time mixing hooks (the differentiable counterpart of the engine's compute / partial / reuse).

Forward hooks on every cached module of the adapter:

* ``record``: keep the module's output (the full step fills the cache) and, for the dual
  router, the block's self-attention values (to score tokens like the engine's V-caching).
* ``mix``: return a soft mixture of the freshly computed output and the cached one. L2C:
  ``s * computed + (1 - s) * cached``. Dual: ``p_c * computed + p_p * partial + p_r * cached``
  with ``partial = mask * computed + (1 - mask) * cached``, ``mask`` the tokens the engine would
  recompute. Recomputing a token subset is exact for these modules (token-wise MLP and
  cross-attention, self-attention with selected queries against all keys / values), so the
  partial branch equals what inference produces. The mixed output becomes the new cache
  entry, as the engine's caches are updated by whatever a step computes.
* ``off``: the hooks do nothing (teacher calls).
"""

from __future__ import annotations

from typing import Any

import torch

from ..adapters import ModelAdapter
from ..plan import num_fresh_tokens
from ..selection import select_tokens, vnorm_score


class Mixer:
    def __init__(self, model: torch.nn.Module, adapter: ModelAdapter) -> None:
        self.model = model
        self.adapter = adapter
        self.blocks = adapter.blocks(model)
        self.names = adapter.module_names(model)
        self.mode = "off"
        self.cache: dict[tuple[int, int], torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.weights: torch.Tensor | None = None  # (rows, blocks, modules) or (rows, blocks, modules, 3)
        self.masks: dict[tuple[int, int], torch.Tensor] = {}  # (rows, tokens, 1) tokens recomputed when partial
        self.staleness: dict[tuple[int, int], torch.Tensor] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> Mixer:
        for b, block in enumerate(self.blocks):
            for m, name in enumerate(self.names):
                self.handles.append(getattr(block, name).register_forward_hook(self._hook(b, m)))
            _, _, to_v, heads = self.adapter.value_projection(block)
            self.handles.append(to_v.register_forward_hook(self._value_hook(b, heads)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _value_hook(self, block: int, heads: int):
        def hook(module, inputs, output):
            if self.mode == "record" and output.shape[1] == inputs[0].shape[1]:
                self.values[block] = output.detach()
            return None

        return hook

    def _hook(self, b: int, m: int):
        def hook(module, inputs, output):
            if self.mode == "record":
                self.cache[b, m] = output.detach()
                return None
            if self.mode != "mix":
                return None
            cached = self.cache[b, m]
            w = self.weights[:, b, m].to(output.dtype)
            if w.ndim == 1:  # L2C: probability of computing
                mixed = w[:, None, None] * output + (1 - w[:, None, None]) * cached
            else:
                mask = self.masks[b, m].to(output.dtype)
                partial = mask * output + (1 - mask) * cached
                mixed = (
                    w[:, 0, None, None] * output + w[:, 1, None, None] * partial + w[:, 2, None, None] * cached
                )
            self.cache[b, m] = mixed
            return mixed

        return hook

    def reset(self) -> None:
        self.cache.clear()
        self.values.clear()
        self.masks.clear()
        self.staleness.clear()

    def update_masks(
        self,
        ratio: float,
        grid: tuple[int, int] | None,
        staleness_weight: float,
        interval: int,
        cell: int,
        bonus: float,
    ) -> None:
        """Tokens the engine would recompute at the next step (V-norm score, staleness, spatial bonus)."""
        for b in range(len(self.blocks)):
            heads = self.adapter.value_projection(self.blocks[b])[3]
            base = vnorm_score(self.values[b], heads, paired=False)
            tokens = base.shape[1]
            k = num_fresh_tokens(ratio, tokens)
            for m in range(len(self.names)):
                stale = self.staleness.get((b, m))
                if stale is None:
                    stale = self.staleness[b, m] = torch.zeros_like(base)
                index = select_tokens(base, k, stale, staleness_weight, interval, grid, cell, bonus)
                stale.add_(1.0).scatter_(1, index, 0.0)
                mask = torch.zeros_like(base).scatter_(1, index, 1.0)
                self.masks[b, m] = mask.unsqueeze(-1)
