"""Forecasting cached features: extrapolate a module's output from its last full computations.

TaylorSeer builds finite differences of a feature over past full steps and evaluates its Taylor
series at the current step. With ``k + 1`` past values that is the degree-``k`` polynomial through
them, which we evaluate directly in Lagrange form: the weights depend only on step numbers (Python
floats, no host sync), and the forecast is one weighted sum of the stored tensors. Uneven spacing
between full steps is handled exactly; order 0 is plain reuse. A plan may instead carry learned
weights per step (:func:`weighted`, fitted by :mod:`.forecast_fit`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


def lagrange_weights(steps: Sequence[float], target: float) -> list[float]:
    """Weights w with ``p(target) = sum w_i y_i`` for the polynomial p through ``(steps[i], y_i)``."""
    weights = []
    for i, s_i in enumerate(steps):
        w = 1.0
        for j, s_j in enumerate(steps):
            if j != i:
                w *= (target - s_j) / (s_i - s_j)
        weights.append(w)
    return weights


def extrapolate(history: Sequence[tuple[int, Any]], target: int, order: int) -> Any:
    """The forecast at step ``target`` of a feature from ``(step, value)`` pairs, oldest first.

    Uses the last ``order + 1`` pairs (fewer if fewer are stored); values are tensors or (nested)
    tuples of tensors / None, combined element by element in their own dtype.
    """
    points = list(history)[-(order + 1) :]
    if len(points) == 1:
        return points[0][1]
    weights = lagrange_weights([s for s, _ in points], target)
    return _combine([v for _, v in points], weights)


def weighted(history: Sequence[tuple[int, Any]], weights: Sequence[float]) -> Any:
    """``sum_j weights[j] * value_j`` over the last ``len(weights)`` ``(step, value)`` pairs, oldest first
    (a learned linear forecast; see :mod:`.forecast_fit`). Values as in :func:`extrapolate`."""
    points = list(history)[-len(weights) :]
    if len(points) != len(weights):
        raise ValueError(f"{len(weights)} forecast weights but only {len(points)} stored values")
    return _combine([v for _, v in points], list(weights))


@dataclass(frozen=True, eq=False)
class ForecastWeights:
    """One forecast's weights, as Python floats and as a float32 tensor on the model's device.

    Eager, :func:`combine` uses the floats. Inside a compiled model it uses the tensor, so the weights
    reach the graph as an input rather than as constants: a step kind compiles once, however many
    different weights its steps use (Lagrange weights change with the distance to the last full
    steps, a budget's full steps are unevenly spaced, learned weights differ per step).
    """

    values: tuple[float, ...]
    tensor: torch.Tensor
    count: int  # len(values), read where a compiled region slices the stored history

    @classmethod
    def of(cls, values: Sequence[float], device: torch.device | str) -> ForecastWeights:
        values = tuple(float(w) for w in values)
        return cls(values, torch.tensor(values, dtype=torch.float32, device=device), len(values))


def combine(values: Sequence[Any], weights: Sequence[float] | ForecastWeights) -> Any:
    """``sum_i weights[i] * values[i]`` for tensors or (nested) tuples of them, in the values' dtype.

    The engine computes the weights before a step (from step numbers) and combines in the step. Given
    :class:`ForecastWeights` inside a compiled region, the sum is taken in float32 with the weights as a
    tensor (one rounding to the values' dtype, fused by the compiler); otherwise with Python floats.
    """
    if isinstance(weights, ForecastWeights):
        if torch.compiler.is_compiling():
            return _combine_traced(list(values), weights.tensor)
        weights = weights.values
    return _combine(list(values), list(weights))


def _combine_traced(values: list[Any], weights: torch.Tensor) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor):
        out = first.float() * weights[0]
        for i, value in enumerate(values[1:], 1):
            out = out + value.float() * weights[i]
        return out.to(first.dtype)
    if isinstance(first, (tuple, list)):
        return type(first)(_combine_traced([v[i] for v in values], weights) for i in range(len(first)))
    return first


def _combine(values: list[Any], weights: list[float]) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor):
        out = values[0] * weights[0]
        for value, weight in zip(values[1:], weights[1:]):
            out.add_(value, alpha=weight)
        return out
    if isinstance(first, (tuple, list)):
        return type(first)(_combine([v[i] for v in values], weights) for i in range(len(first)))
    return first  # None or a non-tensor passed through unchanged
