"""Partial self-attention with a rotary embedding: selected query rows against every key and value row.

A plain processor (no RoPE) computes selected queries when called with ``hidden_states`` = the
selected rows and ``encoder_hidden_states`` = all rows. A RoPE processor cannot: it applies one
rotary table to queries and keys alike, so queries of other rows than the keys would need another
table. For those modules the engine computes the attention itself from the module's own layers, in
the order the family's processor does (declared by the adapter as a :class:`RotaryAttention`):

    q = to_q(selected rows), k = to_k(all rows), v = to_v(all rows)
    (norm_q / norm_k over the inner dim, or per head after splitting heads)
    q gets the rotary table gathered at the selected rows, k the whole table
    attention (diffusers' dispatcher, the processor's backend), output projection

The rotary table is gathered at each sample's selected rows and the batch folded into the row
axis, so the family's own (element-wise) RoPE function applies it unchanged: tables with a batch
axis (Wan's (1, S, 1, D), LTX's (B, S, D)) and without one (Flux's (S, D)) are handled alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

#: where a processor applies the query/key norm and the rotary embedding
STAGES = ("inner", "heads")


@dataclass(frozen=True)
class RotaryAttention:
    """How a RoPE self-attention module is called and applies its rotary embedding.

    Attributes:
        arg: keyword of the rotary embedding in the module's call.
        position: its position among the call's positional arguments (``hidden_states`` is 0), where
            the block passes it positionally (Wan: ``attn1(x, None, None, rope)`` -> 3).
        apply: the family's RoPE function, ``apply(x, table) -> x`` on the tensor it rotates
            (``(B, S, H, D)`` after splitting heads, or ``(B, S, H*D)`` before); must be element-wise
            in the rows (true of every RoPE).
        token_axis: the axis of each table tensor that indexes rows.
        batch_axis: the axis of each table tensor that indexes samples (size 1 or B), or None.
        norm: where ``norm_q`` / ``norm_k`` apply: ``"inner"`` (on (B, S, H*D), before splitting
            heads: Wan, LTX) or ``"heads"`` (per head: Flux, HunyuanVideo).
        rope: where the rotary embedding applies: ``"inner"`` (LTX) or ``"heads"`` (Wan, Flux).
        processors: class names of the processors this reproduces; a module with another processor
            (an IP-adapter, a user's own) is computed whole instead of partially.
    """

    arg: str
    apply: Callable[[torch.Tensor, Any], torch.Tensor]
    position: int | None = None
    token_axis: int = 0
    batch_axis: int | None = None
    norm: str = "heads"
    rope: str = "heads"
    processors: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("norm", "rope"):
            if getattr(self, name) not in STAGES:
                raise ValueError(f"RotaryAttention.{name}={getattr(self, name)!r}; allowed: {', '.join(STAGES)}")

    def table(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The rotary embedding of this call (None where the call has none)."""
        if self.arg in kwargs:
            return kwargs[self.arg]
        if self.position is not None and len(args) > self.position:
            return args[self.position]
        return None

    def supports(self, attn: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether this call can be computed partially here (else the engine computes it whole)."""
        processor = getattr(attn, "processor", None)
        if type(processor).__name__ not in self.processors or getattr(processor, "_parallel_config", None):
            return False
        if any(kwargs.get(name) is not None for name in ("encoder_hidden_states", "attention_mask")):
            return False
        if any(a is not None for i, a in enumerate(args[1:], 1) if i != self.position):
            return False  # positional encoder_hidden_states / attention_mask given
        return all(hasattr(attn, name) for name in ("to_q", "to_k", "to_v", "norm_q", "norm_k", "heads"))

    def slice_table(self, table: Any, picked: torch.Tensor) -> Any:
        """The table at each sample's selected rows, the batch folded into the row axis: rows b*k + i."""
        if isinstance(table, (tuple, list)):
            return type(table)(self.slice_table(t, picked) for t in table)
        if not isinstance(table, torch.Tensor):
            return table
        batch, k = picked.shape
        if self.batch_axis is None:
            return table.index_select(self.token_axis, picked.reshape(-1))
        t = table.movedim((self.batch_axis, self.token_axis), (0, 1))
        t = t.expand(batch, *t.shape[1:])
        rows = t[torch.arange(batch, device=picked.device).unsqueeze(1), picked]  # (batch, k, ...)
        rows = rows.reshape(1, batch * k, *rows.shape[2:])
        return rows.movedim((0, 1), (self.batch_axis, self.token_axis))


def rotary_partial_attention(
    attn: torch.nn.Module, spec: RotaryAttention, hidden: torch.Tensor, picked: torch.Tensor,
    args: tuple[Any, ...], kwargs: dict[str, Any],
) -> torch.Tensor:
    """The module's output rows ``picked`` ((batch, k) row indices) for input ``hidden`` (B, S, C),
    computed with selected queries against all keys and values."""
    batch, k = picked.shape
    table = spec.table(args, kwargs)
    gathered = hidden.gather(1, picked.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    query, key, value = attn.to_q(gathered), attn.to_k(hidden), attn.to_v(hidden)
    query_table = spec.slice_table(table, picked) if table is not None else None

    def rotate(x: torch.Tensor, tab: Any, folded: bool) -> torch.Tensor:
        if tab is None:
            return x
        if not folded:
            return spec.apply(x, tab)
        shape = x.shape
        return spec.apply(x.reshape(1, batch * k, *shape[2:]), tab).reshape(shape)

    if spec.norm == "inner":
        query, key = attn.norm_q(query), attn.norm_k(key)
    if spec.rope == "inner":
        query, key = rotate(query, query_table, True), rotate(key, table, False)
    query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
    if spec.norm == "heads":
        query, key = attn.norm_q(query), attn.norm_k(key)
    if spec.rope == "heads":
        query, key = rotate(query, query_table, True), rotate(key, table, False)
    out = dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                backend=getattr(attn.processor, "_attention_backend", None))
    out = out.flatten(2, 3).type_as(query)
    to_out = getattr(attn, "to_out", None)
    if to_out is not None:
        for layer in to_out:
            out = layer(out)
    return out
