"""Training-time mixing hooks (the differentiable counterpart of the engine's compute / partial / reuse).

Forward hooks on every cached module of every block (the adapter's :class:`BlockInfo` list, so
blocks of several lists with different modules are covered):

* ``record``: keep the module's output (the full step fills the cache) and, for the dual
  router, the block's self-attention values over its image rows (to score tokens like the engine's
  V-caching).
* ``mix``: return a soft mixture of the freshly computed output and the cached one. L2C:
  ``s * computed + (1 - s) * cached``. Dual: ``p_c * computed + p_p * partial + p_r * cached``
  with ``partial = mask * computed + (1 - mask) * cached``, ``mask`` the image rows the engine would
  recompute plus every text row. Recomputing a row subset is exact for the modules that allow it
  (row-wise MLPs and cross-attention, self-attention with selected queries against all keys and
  values), so the partial branch equals what inference produces; modules that cannot (joint
  attention, Sana's conv MLP) have no partial choice. Tuple outputs are mixed element by element.
  The mixed output becomes the new cache entry, as the engine's caches are updated by whatever a
  step computes.
* ``off``: the hooks do nothing (teacher calls).

Forecasting L2C (:meth:`Mixer.start_forecast`, ``forecast_order`` k >= 1): what a reused branch gets is
the engine's forecast, the degree-k Lagrange extrapolation from the module's last k + 1 *computations*
(full steps and cache steps where it was computed, as the engine's history holds them), or plain reuse
while only one is stored. Which computations those are depends on the router's choices at the earlier
cache steps, so the mixer keeps, per module, every computed output of the unrolled steps and the
probability of each possible history (the steps of its last k + 1 computations, per row):
``s * computed + (1 - s) * E[forecast]``, the expectation of the engine's output over independent
choices, which is exactly the engine's output when every ``s`` is 0 or 1.

Forecasting dual router (the same with the three choices, weights ``(p_c, p_p, p_r)``): the reused branch is
``E[forecast]`` and the partial one ``mask * computed + (1 - mask) * E[forecast]``, as the engine recomputes the
selected rows into the step's forecast (``engine.run_module`` / ``_recompute_rows``). What a partial
computation contributes to the history, at the engine's default ``forecast_reanchor=False`` (the trainer
matches only that default): nothing while two computations are stored (the forecast is recomputed from them
at the next step, the partial rows are not a point; only the compute choice, and a partial choice of a
module that cannot recompute rows, which the engine computes whole, adds one), and while one is stored
(the first cycle of a generation) the partial output replaces the cached output that plain reuse returns,
as the engine writes the recomputed rows into its cache. So each length-1 history ``h`` also carries
``P(h) * E[cached output | h]`` (:attr:`Mixer.bases`), updated ``p_r * base + p_p * partial(P(h) *
computed, base)`` at each cache step that does not compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..adapters import ModelAdapter, ModuleSpec
from ..adapters.base import BlockInfo, resolve
from ..forecast import lagrange_weights
from ..plan import num_fresh_tokens
from ..selection import select_tokens, vnorm_score
from .costs import image_rows


def _map(fn, *values: Any) -> Any:
    """``fn`` over tensors, element by element through tuples (None passes through)."""
    first = values[0]
    if isinstance(first, tuple):
        return tuple(_map(fn, *items) for items in zip(*values))
    if first is None:
        return None
    return fn(*values)


def _expand(weights: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-sample weights for a module whose batch folds frames or positions into the samples (Latte)."""
    return weights if weights.shape[0] == batch else weights.repeat_interleave(batch // weights.shape[0], dim=0)


@dataclass(frozen=True)
class _Cell:
    block: int
    column: int
    spec: ModuleSpec
    grid: str  # the block list's token-grid axes
    group: Any  # modules of a block sharing one selection


class Mixer:
    def __init__(self, model: torch.nn.Module, adapter: ModelAdapter, grid: tuple[int, int, int] | None = None) -> None:
        self.model = model
        self.adapter = adapter
        self.infos = adapter.block_infos(model)
        self.blocks = [info.block for info in self.infos]
        self.layout = adapter.layout(model)
        self.names = self.layout.modules
        self.grid = grid
        columns = {name: i for i, name in enumerate(self.names)}
        self.cells = [
            _Cell(info.index, columns[spec.name], spec, info.spec.grid, spec.group or columns[spec.name])
            for info in self.infos for spec in info.modules
        ]
        self.mode = "off"
        self.cache: dict[tuple[int, int, int], Any] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.weights: torch.Tensor | None = None  # (rows, blocks, modules) or (rows, blocks, modules, 3)
        self.masks: dict[tuple[int, Any], torch.Tensor] = {}  # (block, group) -> (batch, image rows) 0/1
        self.staleness: dict[tuple[int, Any], torch.Tensor] = {}
        self.calls: dict[int, dict[int, int]] = {}
        self.heads: dict[int, int] = {}  # block -> heads of its value projection
        self.handles: list[Any] = []
        # forecasting (start_forecast): order, the current step's offset, per module its computed outputs
        # by offset and the probability (per row) of each history, a tuple of offsets, oldest first
        self.forecast_order = 0
        self.offset = 0
        self.points: dict[tuple[int, int, int], dict[int, Any]] = {}
        self.histories: dict[tuple[int, int, int], dict[tuple[int, ...], torch.Tensor]] = {}
        # per module, for each history of one computation: P(history) * E[the output plain reuse returns | it]
        self.bases: dict[tuple[int, int, int], dict[tuple[int, ...], Any]] = {}
        self.fresh: torch.Tensor | None = None  # (rows,) bool: at the next full step these rows' history restarts

    def __enter__(self) -> Mixer:
        for info in self.infos:
            self.handles.append(info.block.register_forward_pre_hook(self._block_hook(info.index)))
            value = resolve(info.block, info.spec.value) if info.spec.value else None
            attn = resolve(info.block, info.spec.value.rsplit(".", 1)[0]) if value is not None else None
            if value is not None and attn is not None and hasattr(attn, "heads"):
                self.heads[info.index] = attn.heads
                self.handles.append(value.register_forward_hook(self._value_hook(info, attn.heads)))
        for cell in self.cells:
            module = getattr(self.blocks[cell.block], cell.spec.name)
            self.handles.append(module.register_forward_hook(self._hook(cell)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _image_rows(self, cell_grid: str, rows: int) -> int:
        return rows if self.grid is None else min(rows, image_rows(self.grid, cell_grid))

    def _block_hook(self, block: int):
        def hook(module, inputs):
            self.calls[block] = {}

        return hook

    def _value_hook(self, info: BlockInfo, heads: int):
        text_rows = info.spec.value_text_rows

        def hook(module, inputs, output):
            if self.mode == "record":
                image = self._image_rows(info.spec.grid, output.shape[1])
                if text_rows == "first":
                    output = output[:, output.shape[1] - image :]
                elif text_rows == "last":
                    output = output[:, :image]
                self.values[info.index] = output.detach()
            return None

        return hook

    def _hook(self, cell: _Cell):
        b, m = cell.block, cell.column

        def hook(module, inputs, output):
            calls = self.calls.setdefault(b, {})
            index = calls.get(m, 0)
            calls[m] = index + 1
            key = (b, m, index)
            if self.forecast_order and self.mode in ("record", "mix"):
                return self._forecast_hook(key, output, cell)
            if self.mode == "record":
                self.cache[key] = _map(torch.Tensor.detach, output)
                return None
            if self.mode != "mix":
                return None
            cached = self.cache[key]
            w = self.weights[:, b, m]
            if w.ndim == 1:  # L2C: probability of computing
                mixed = _map(lambda o, c: _mix2(_expand(w, o.shape[0]).to(o.dtype), o, c), output, cached)
            else:
                partial = self._partial_of(cell, index)
                fresh = output if partial is None else partial(output, cached)
                mixed = _map(lambda o, p, c: _mix3(_expand(w, o.shape[0]).to(o.dtype), o, p, c), output, fresh,
                             cached)
            self.cache[key] = mixed
            return mixed

        return hook

    def _partial_of(self, cell: _Cell, index: int):
        """``partial(computed, cached)``: the rows the engine recomputes at this step from ``computed`` (every text
        row; of joint attention's (image, text) the picked image rows and all text), the others from ``cached``;
        None where the module has no partial computation (the engine computes it whole)."""
        mask = self.masks.get((cell.block, cell.group))
        kind = cell.spec.calls[min(index, len(cell.spec.calls) - 1)]
        if mask is None or not cell.spec.can_partial or kind != "image":
            return None

        def partial(computed: Any, cached: Any) -> Any:
            if isinstance(computed, tuple):  # joint attention (image, text): image rows picked, text all fresh
                return (_partial(mask, "none", computed[0], cached[0]), *computed[1:])
            return _map(lambda o, c: _partial(mask, cell.spec.text_rows, o, c), computed, cached)

        return partial

    def reset(self) -> None:
        self.cache.clear()
        self.values.clear()
        self.masks.clear()
        self.staleness.clear()
        self.points.clear()
        self.histories.clear()
        self.bases.clear()
        self.fresh = None

    # ---- forecasting (L2C) ------------------------------------------------------------------------
    def start_forecast(self, order: int) -> None:
        """Forecast reused outputs at order ``order`` (0: the plain cache) from here on. Before every call set
        :attr:`offset` (steps since the unroll's first step; the Lagrange weights need only differences), and
        before every full step :attr:`fresh`, the rows (bool, per sample) whose history starts there (the others
        keep theirs); :meth:`reset` before a new unroll."""
        self.forecast_order = order
        self.points.clear()
        self.histories.clear()
        self.bases.clear()
        self.fresh = None

    def _forecast_hook(self, key: tuple[int, int, int], output: Any, cell: _Cell) -> Any:
        """Record (full step: every row computes) or mix (cache step) one module's output, keeping the
        distribution of its forecast history; see the module docstring."""
        offset, keep = self.offset, self.forecast_order + 1
        points = self.points.setdefault(key, {})
        old = self.histories.get(key, {})
        old_bases = self.bases.get(key, {})
        new: dict[tuple[int, ...], torch.Tensor] = {}
        bases: dict[tuple[int, ...], Any] = {}

        def add(history: tuple[int, ...], p: torch.Tensor) -> None:
            new[history] = new[history] + p if history in new else p

        if self.mode == "record":
            points[offset] = _map(torch.Tensor.detach, output)
            fresh = self.fresh.to(_first_tensor(output).device)  # rows whose history starts here
            for history, p in old.items():
                add((*history, offset)[-keep:], p * (~fresh).to(p.dtype))
            add((offset,), fresh.float())
            bases[(offset,)] = _map(lambda o: _scale(fresh.float(), o) * o, points[offset])
            self.histories[key], self.bases[key] = new, bases
            return None
        w = self.weights[:, key[0], key[1]]
        partial = None
        if w.ndim == 1:  # L2C: compute with probability s, else reuse
            compute, p_partial, p_reuse = w, None, 1 - w
        else:  # dual: compute / partial / reuse (a module without partial computation is computed whole)
            partial = self._partial_of(cell, key[2])
            compute = w[:, 0] if partial is not None else w[:, 0] + w[:, 1]
            p_partial, p_reuse = w[:, 1], w[:, 2]
        forecast = self._expected_forecast(old, old_bases, points, offset, w)
        if w.ndim == 1:
            mixed = _map(lambda o, f: _mix2(_expand(w, o.shape[0]).to(o.dtype), o, f), output, forecast)
        else:
            fresh = output if partial is None else partial(output, forecast)
            mixed = _map(lambda o, p, f: _mix3(_expand(w, o.shape[0]).to(o.dtype), o, p, f), output, fresh,
                         forecast)
        points[offset] = output
        for history, p in old.items():
            add((*history, offset)[-keep:], p * compute)
            add(history, p * (1 - compute))
            if len(history) == 1:  # not computed: what plain reuse returns is the partial output, or stays
                base = old_bases[history]
                stay = _map(lambda b: _scale(p_reuse, b) * b, base)
                if partial is not None:
                    written = partial(_map(lambda o, p=p: _scale(p, o) * o, output), base)
                    stay = _map(lambda s, r: s + _scale(p_partial, r) * r, stay, written)
                bases[history] = stay
        self.histories[key], self.bases[key] = new, bases
        return mixed

    def _expected_forecast(self, histories: dict[tuple[int, ...], torch.Tensor], bases: dict[tuple[int, ...], Any],
                           points: dict[int, Any], target: int, like: torch.Tensor) -> Any:
        """``sum_h P(h) * forecast_h(target)``: the engine's Lagrange forecast from history ``h``'s points, or for a
        history of one point ``P(h) * E[cached output | h]`` (plain reuse of the point, or of the partial outputs
        written over it), as one weighted sum of the stored outputs, oldest first."""
        coeff: dict[int, torch.Tensor] = {}
        for history, p in histories.items():
            if len(history) == 1:
                continue
            for step, w in zip(history, lagrange_weights(list(history), target)):
                term = p * w
                coeff[step] = coeff[step] + term if step in coeff else term
        steps = sorted(coeff)
        values = [points[s] for s in steps] + [bases[h] for h in histories if len(h) == 1]

        def combine(*tensors: torch.Tensor) -> torch.Tensor:
            out = None
            for i, t in enumerate(tensors):
                term = _scale(coeff[steps[i]].to(like.device), t) * t if i < len(steps) else t
                out = term if out is None else out + term
            return out

        return _map(combine, *values)

    def update_masks(
        self,
        ratio: float,
        grid: tuple[int, int] | None,
        staleness_weight: float,
        interval: int,
        cell: int,
        bonus: float,
        weights: torch.Tensor | None = None,
    ) -> None:
        """Image rows the engine would recompute at the next step (V-norm score, staleness, spatial bonus),
        one selection per (block, group) as the engine shares them. ``grid`` is the (rows, cols) grid of
        the spatial bonus for blocks spanning every image token (None: no bonus).

        The engine selects (and so ages the other tokens' staleness) only where some module of the group is
        partial at the step: given the step's dual ``weights`` (rows, blocks, modules, 3), a row's staleness
        moves by the probability ``q`` of that, ``stale + q * (aged - stale)``, which is the engine's for 0/1
        choices (None: every row selects, ``q = 1``)."""
        self.masks = {}
        for c in self.cells:
            key = (c.block, c.group)
            if key in self.masks or not c.spec.can_partial or c.block not in self.values:
                continue
            base = vnorm_score(self.values[c.block], self.heads[c.block], paired=False)
            k = num_fresh_tokens(ratio, base.shape[1])
            stale = self.staleness.get(key)
            if stale is None:
                stale = self.staleness[key] = torch.zeros_like(base)
            index = select_tokens(base, k, stale, staleness_weight, interval, self._bonus_grid(c.grid, grid), cell,
                                  bonus)
            self.masks[key] = torch.zeros_like(base).scatter_(1, index, 1.0)
            if not k:  # no row to recompute: the engine selects nothing
                continue
            aged = (stale + 1.0).scatter_(1, index, 0.0)
            if weights is None:
                stale.copy_(aged)
                continue
            keep = torch.ones(weights.shape[0], dtype=stale.dtype, device=stale.device)  # P(no module partial)
            for other in self.cells:
                if (other.block, other.group) == key and other.spec.can_partial and "image" in other.spec.calls:
                    keep = keep * (1 - weights[:, other.block, other.column, 1].detach().to(stale.dtype))
            q = _expand(1 - keep, stale.shape[0]).view(-1, 1)
            stale.add_(q * (aged - stale))

    def _bonus_grid(self, axes: str, grid: tuple[int, int] | None) -> tuple[int, int] | None:
        if self.grid is None:
            return grid
        frames, rows, cols = self.grid
        if axes == "space" or (axes == "all" and frames == 1):
            return rows, cols
        if axes == "all":
            return frames * rows, cols
        return None


def _scale(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-sample ``p`` shaped to multiply ``t`` (batch first; samples folded into the batch repeated)."""
    return _expand(p, t.shape[0]).to(t.dtype).view(-1, *([1] * (t.ndim - 1)))


def _first_tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else next(v for v in value if isinstance(v, torch.Tensor))


def _mix2(w: torch.Tensor, computed: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    w = w.view(-1, *([1] * (computed.ndim - 1)))
    return w * computed + (1 - w) * cached


def _mix3(w: torch.Tensor, computed: torch.Tensor, partial: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    shape = (-1, *([1] * (computed.ndim - 1)))
    return w[:, 0].view(shape) * computed + w[:, 1].view(shape) * partial + w[:, 2].view(shape) * cached


def _partial(mask: torch.Tensor, text_rows: str, computed: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """The selected image rows (and every text row) from ``computed``, the rest from ``cached``."""
    mask = _expand(mask, computed.shape[0]).to(computed.dtype)
    text = computed.shape[1] - mask.shape[1]
    if text > 0:
        ones = torch.ones(mask.shape[0], text, dtype=mask.dtype, device=mask.device)
        mask = torch.cat([ones, mask] if text_rows == "first" else [mask, ones], dim=1)
    mask = mask.view(*mask.shape, *([1] * (computed.ndim - 2)))
    return mask * computed + (1 - mask) * cached
