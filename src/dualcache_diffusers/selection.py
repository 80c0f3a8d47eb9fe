"""Token scorers: which tokens a conservative step recomputes (higher score = recomputed).

Scores have shape ``(G, N)`` with one row per *selection group*: when a batched call carries
both CFG halves, the halves share a group (and so the same tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_rows(score: torch.Tensor, paired: bool) -> torch.Tensor:
    """Average the two CFG halves of a batch into one row per image when ``paired``."""
    if not paired:
        return score
    half = score.shape[0] // 2
    return 0.5 * (score[:half] + score[half:])


#: selections that score tokens by the forecast error measured at the last full step (dual forecasting)
ERROR_SELECTIONS = ("forecast_error", "forecast_error+vnorm")


def normalize_score(score: torch.Tensor) -> torch.Tensor:
    """A score row per group L2-normalized over tokens and shifted to be >= 0 (what every scorer returns)."""
    return _normalize(score)


def _normalize(score: torch.Tensor) -> torch.Tensor:
    # L2-normalize over tokens as the reference code does, then shift to be >= 0 so that the
    # multiplicative spatial bonus raises the cell's best token (with raw V-norm scores, which are
    # mostly negative, the reference code's "bonus" actually lowered it).
    score = F.normalize(score, p=2, dim=1)
    return score - score.amin(dim=1, keepdim=True)


def vnorm_score(value: torch.Tensor, heads: int, paired: bool) -> torch.Tensor:
    """V-caching score from the value projection ``(B, N, heads * head_dim)`` of a full step.

    ``sum_heads(1 - |v_h|)``: tokens whose value vectors have the smallest norms score highest.
    Needs no attention probabilities, so fused kernels (SDPA, flash, sage) stay in use.
    """
    norms = value.detach().float().unflatten(-1, (heads, -1)).norm(dim=-1)  # (B, N, H)
    return _normalize(group_rows((1.0 - norms).sum(dim=-1), paired))


def forecast_error(predicted: torch.Tensor, actual: torch.Tensor, paired: bool) -> torch.Tensor:
    """Per-token error ``(G, N)`` of a forecast ``(B, N, C)`` against the computed output, L2-normalized over
    tokens (so each module of a block weighs the same when their errors are added up). Tokens whose forecast
    was worst score highest. Reads no attention map; one subtraction and a norm per module at full steps."""
    error = (actual.detach().float() - predicted.detach().float()).norm(dim=-1)
    return F.normalize(group_rows(error, paired), p=2, dim=1)


def attention_score(query: torch.Tensor, key: torch.Tensor, heads: int, paired: bool) -> torch.Tensor:
    """ToCa's self-attention score: attention each token receives, head-averaged, summed over queries.

    Materializes the ``(B, heads, N, N)`` probabilities, so it costs an extra attention map per
    block at full steps and cannot use fused kernels.
    """
    q = query.detach().float().unflatten(-1, (heads, -1)).transpose(1, 2)
    k = key.detach().float().unflatten(-1, (heads, -1)).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    received = probs.mean(dim=1).sum(dim=1)  # (B, N)
    return _normalize(group_rows(received, paired))


def attention_score_flops(batch: int, tokens: int, inner_dim: int) -> int:
    """Matmul FLOPs of :func:`attention_score` (the q @ k^T product)."""
    return 2 * batch * tokens * tokens * inner_dim


def spatial_bonus(score: torch.Tensor, grid: tuple[int, int] | None, cell: int, bonus: float) -> torch.Tensor:
    """Multiply the best score of every ``cell x cell`` patch of the token grid by ``1 + bonus``."""
    if bonus == 0 or cell <= 1 or grid is None:
        return score
    h, w = grid
    groups, n = score.shape
    if h * w != n or h % cell or w % cell:
        return score
    cells = score.view(groups, h // cell, cell, w // cell, cell).permute(0, 1, 3, 2, 4)
    cells = cells.reshape(groups, -1, cell * cell)
    is_best = F.one_hot(cells.argmax(dim=-1), cell * cell).to(score.dtype)
    cells = cells * (1.0 + bonus * is_best)
    cells = cells.view(groups, h // cell, w // cell, cell, cell).permute(0, 1, 3, 2, 4)
    return cells.reshape(groups, n)


def select_tokens(
    base: torch.Tensor,
    k: int,
    staleness: torch.Tensor | None,
    staleness_weight: float,
    interval: int,
    grid: tuple[int, int] | None,
    cell: int,
    bonus: float,
) -> torch.Tensor:
    """Indices ``(G, k)`` of the tokens to recompute: top-k of base + staleness, then spatial bonus."""
    score = base
    if staleness is not None and staleness_weight:
        score = score + staleness_weight * staleness / max(1, interval)
    score = spatial_bonus(score, grid, cell, bonus)
    return score.topk(k, dim=1, sorted=False).indices


def random_base(groups: int, tokens: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand((groups, tokens), generator=generator, device=device)
