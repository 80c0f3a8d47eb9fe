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


def combine(values: Sequence[Any], weights: Sequence[float]) -> Any:
    """``sum_i weights[i] * values[i]`` for tensors or (nested) tuples of them, in the values' dtype.

    The engine computes the weights before a step (from step numbers) and combines in the step, so a
    compiled model sees only tensors and the same few weights at every recurrence of a step kind.
    """
    return _combine(list(values), list(weights))


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
