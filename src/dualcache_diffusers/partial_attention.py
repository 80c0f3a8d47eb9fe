"""Partial self- and joint attention with a rotary embedding: selected query rows against every key and value row.

A plain processor (no RoPE) computes selected queries when called with ``hidden_states`` = the
selected rows and ``encoder_hidden_states`` = all rows. A RoPE processor cannot: it applies one
rotary table to queries and keys alike, so queries of other rows than the keys would need another
table. For those modules the engine computes the attention itself from the module's own layers, in
the order the family's processor does (declared by the adapter as a :class:`RotaryAttention`):

    q = to_q(selected rows), k = to_k(all rows), v = to_v(all rows)
    (norm_q / norm_k over the inner dim, or per head after splitting heads)
    q gets the rotary table gathered at the selected rows, k the whole table
    attention (diffusers' dispatcher, the processor's backend), output projection

Joint attention (Flux, Chroma, HunyuanVideo) also gets a text stream, ``encoder_hidden_states``:
every text row is a query too (text rows are always recomputed), projected by ``add_q/k/v_proj``
and normed by ``norm_added_q/k`` where the module has them (double-stream blocks) or by the image
stream's layers where it has not (HunyuanVideo's single-stream blocks). The text rows join the
sequence first (Flux, CogVideoX) or last (HunyuanVideo); the rotary table covers the whole sequence
(Flux) or the image rows only (HunyuanVideo, CogVideoX). The call then returns the selected image
rows (through ``to_out``) and every text row (through ``to_add_out`` where the text stream has its
own projections, else ``to_out``), as the processor's ``(image, text)`` tuple.

The rotary table is gathered at each sample's selected rows and the batch folded into the row
axis, so the family's own (element-wise) RoPE function applies it unchanged: tables with a batch
axis (Wan's (1, S, 1, D), LTX's (B, S, D)) and without one (Flux's (S, D)) are handled alike. An
attention mask (where the processor passes it to the attention as is) is gathered at the query rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

#: where a processor applies the query/key norm and the rotary embedding
STAGES = ("inner", "heads")
#: where the text stream's rows join the attention sequence
TEXT_PLACES = ("none", "first", "last")
#: the call's arguments this reproduces (others, when given, make the call computed whole)
_KNOWN_ARGS = ("hidden_states", "encoder_hidden_states", "attention_mask")


@dataclass(frozen=True)
class RotaryAttention:
    """How a RoPE attention module is called and applies its rotary embedding.

    Attributes:
        arg: keyword of the rotary embedding in the module's call.
        apply: the family's RoPE function, ``apply(x, table) -> x`` on the tensor it rotates
            (``(B, S, H, D)`` after splitting heads, or ``(B, S, H*D)`` before); must be element-wise
            in the rows (true of every RoPE).
        position: its position among the call's positional arguments (``hidden_states`` is 0), where
            the block passes it positionally (Wan: ``attn1(x, None, None, rope)`` -> 3).
        token_axis: the axis of each table tensor that indexes rows.
        batch_axis: the axis of each table tensor that indexes samples (size 1 or B), or None.
        norm: where ``norm_q`` / ``norm_k`` apply: ``"inner"`` (on (B, S, H*D), before splitting
            heads: Wan, LTX) or ``"heads"`` (per head: Flux, HunyuanVideo).
        rope: where the rotary embedding applies: ``"inner"`` (LTX) or ``"heads"`` (Wan, Flux).
        processors: class names of the processors this reproduces; a module with another processor
            (an IP-adapter, a user's own) is computed whole instead of partially.
        text: joint attention: where the rows of ``encoder_hidden_states`` join the sequence,
            ``"first"`` ([text; image]: Flux) or ``"last"`` ([image; text]: HunyuanVideo); ``"none"``
            for self-attention (a call with ``encoder_hidden_states`` is then computed whole).
        text_rope: the rotary table covers the text rows too (Flux: the table spans [text; image]);
            False where it covers the image rows only (HunyuanVideo).
        mask: the processor passes ``attention_mask`` to the attention as it is (a boolean or additive
            mask of shape (B or 1, H or 1, queries or 1, keys)); False: a call with a mask is computed whole.
    """

    arg: str
    apply: Callable[[torch.Tensor, Any], torch.Tensor]
    position: int | None = None
    token_axis: int = 0
    batch_axis: int | None = None
    norm: str = "heads"
    rope: str = "heads"
    processors: tuple[str, ...] = ()
    text: str = "none"
    text_rope: bool = True
    mask: bool = False

    def __post_init__(self) -> None:
        for name in ("norm", "rope"):
            if getattr(self, name) not in STAGES:
                raise ValueError(f"RotaryAttention.{name}={getattr(self, name)!r}; allowed: {', '.join(STAGES)}")
        if self.text not in TEXT_PLACES:
            raise ValueError(f"RotaryAttention.text={self.text!r}; allowed: {', '.join(TEXT_PLACES)}")

    def _arg(self, args: tuple[Any, ...], kwargs: dict[str, Any], name: str, position: int | None) -> Any:
        if name in kwargs:
            return kwargs[name]
        if position is not None and len(args) > position:
            return args[position]
        return None

    def table(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The rotary embedding of this call (None where the call has none)."""
        return self._arg(args, kwargs, self.arg, self.position)

    def encoder(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
        """The call's text stream (joint attention), or None."""
        return self._arg(args, kwargs, "encoder_hidden_states", 1)

    def attention_mask(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
        return self._arg(args, kwargs, "attention_mask", 2)

    def supports(self, attn: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether this call can be computed partially here (else the engine computes it whole)."""
        processor = getattr(attn, "processor", None)
        if type(processor).__name__ not in self.processors or getattr(processor, "_parallel_config", None):
            return False
        if getattr(attn, "fused_projections", False):
            return False
        if any(v is not None for name, v in kwargs.items() if name not in (*_KNOWN_ARGS, self.arg)):
            return False  # an IP-adapter's inputs, a user's attention kwargs
        if any(a is not None for i, a in enumerate(args[3:], 3) if i != self.position):
            return False
        if self.encoder(args, kwargs) is not None and self.text == "none":
            return False
        mask = self.attention_mask(args, kwargs)
        if mask is not None and not (self.mask and isinstance(mask, torch.Tensor) and mask.ndim == 4):
            return False
        return all(hasattr(attn, name) for name in ("to_q", "to_k", "to_v", "heads"))

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

    def narrow_table(self, table: Any, start: int, length: int, total: int) -> Any:
        """The table at the contiguous rows ``start .. start + length`` of ``total`` (the whole table when all)."""
        if start == 0 and length == total:
            return table
        if isinstance(table, (tuple, list)):
            return type(table)(self.narrow_table(t, start, length, total) for t in table)
        if not isinstance(table, torch.Tensor):
            return table
        return table.narrow(self.token_axis, start, length)


@dataclass
class _Stream:
    """One stream's queries, keys and values (image, or the text of joint attention)."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor


def _project(attn: torch.nn.Module, spec: RotaryAttention, q_in: torch.Tensor, kv_in: torch.Tensor,
             added: bool) -> _Stream:
    """Queries of ``q_in``, keys and values of ``kv_in`` (normed here where the norm is over the inner dim)."""
    names = ("add_q_proj", "add_k_proj", "add_v_proj") if added else ("to_q", "to_k", "to_v")
    q, k, v = (getattr(attn, n)(x) for n, x in zip(names, (q_in, kv_in, kv_in)))
    if spec.norm == "inner":
        norm_q, norm_k = _norms(attn, added)
        q, k = _norm(norm_q, q), _norm(norm_k, k)
    return _Stream(q, k, v)


def _norms(attn: torch.nn.Module, added: bool) -> tuple[Any, Any]:
    names = ("norm_added_q", "norm_added_k") if added else ("norm_q", "norm_k")
    return getattr(attn, names[0], None), getattr(attn, names[1], None)


def _norm(norm: torch.nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


def rotary_partial_attention(
    attn: torch.nn.Module, spec: RotaryAttention, hidden: torch.Tensor, picked: torch.Tensor,
    args: tuple[Any, ...], kwargs: dict[str, Any],
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The module's output rows ``picked`` ((batch, k) row indices) for input ``hidden`` (B, S, C),
    computed with selected queries against all keys and values. With a text stream (joint attention)
    the result is ``(image rows picked, every text row)``, as the processor's ``(image, text)``."""
    batch, k = picked.shape
    rows = hidden.shape[1]
    table = spec.table(args, kwargs)
    encoder = spec.encoder(args, kwargs)
    text = 0 if encoder is None else encoder.shape[1]
    total = rows + text
    image_start = text if spec.text == "first" else 0  # where the image rows sit in the sequence
    text_start = 0 if spec.text == "first" else rows

    gathered = hidden.gather(1, picked.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    streams = [_project(attn, spec, gathered, hidden, added=False)]
    if encoder is not None:
        streams.append(_project(attn, spec, encoder, encoder, added=getattr(attn, "add_q_proj", None) is not None))

    # rotary tables: queries at the selected rows (batch folded), keys at every row, in sequence positions
    image_table = text_table = query_table = None
    if table is not None:
        if encoder is None or spec.text_rope:
            image_table = spec.narrow_table(table, image_start, rows, total)
            query_table = spec.slice_table(table, picked + image_start)
            text_table = spec.narrow_table(table, text_start, text, total) if encoder is not None else None
        else:  # the table covers the image rows only; text rows are not rotated
            image_table, query_table = table, spec.slice_table(table, picked)

    def rotate(x: torch.Tensor, tab: Any, folded: bool) -> torch.Tensor:
        if tab is None:
            return x
        if not folded:
            return spec.apply(x, tab)
        shape = x.shape
        return spec.apply(x.reshape(1, batch * k, *shape[2:]), tab).reshape(shape)

    def stage(stream: _Stream, is_image: bool, where: str) -> None:
        if where == "heads":
            stream.query, stream.key, stream.value = (x.unflatten(2, (attn.heads, -1))
                                                      for x in (stream.query, stream.key, stream.value))
            if spec.norm == "heads":
                norm_q, norm_k = _norms(attn, not is_image and getattr(attn, "add_q_proj", None) is not None)
                stream.query, stream.key = _norm(norm_q, stream.query), _norm(norm_k, stream.key)
        if spec.rope == where:
            q_table, k_table = (query_table, image_table) if is_image else (text_table, text_table)
            stream.query, stream.key = rotate(stream.query, q_table, is_image), rotate(stream.key, k_table, False)

    for i, stream in enumerate(streams):
        stage(stream, i == 0, "inner")
        stage(stream, i == 0, "heads")

    ordered = streams if spec.text != "first" else streams[::-1]
    query, key, value = (torch.cat([getattr(s, n) for s in ordered], dim=1) if len(ordered) > 1
                         else getattr(ordered[0], n) for n in ("query", "key", "value"))
    mask = spec.attention_mask(args, kwargs)
    if mask is not None and mask.shape[-2] != 1:  # a mask per query row: keep the queries' rows
        positions = picked + image_start
        if encoder is not None:
            text_rows = torch.arange(text_start, text_start + text, device=picked.device).expand(batch, text)
            positions = torch.cat([text_rows, positions] if spec.text == "first" else [positions, text_rows], dim=1)
        mask = mask.expand(batch, mask.shape[1], mask.shape[2], mask.shape[3])
        mask = mask.gather(2, positions[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
    out = dispatch_attention_fn(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                backend=getattr(attn.processor, "_attention_backend", None))
    out = out.flatten(2, 3).type_as(query)
    if encoder is None:
        return _layers(getattr(attn, "to_out", None), out)
    text_out, image_out = (out[:, :text], out[:, text:]) if spec.text == "first" else (out[:, k:], out[:, :k])
    return _layers(getattr(attn, "to_out", None), image_out), _layers(_text_out(attn), text_out)


def _text_out(attn: torch.nn.Module) -> Any:
    """The text rows' output layers: ``to_add_out`` of a module with its own text projections, else
    ``to_out`` (CogVideoX projects both streams with it; HunyuanVideo's single blocks have neither)."""
    if getattr(attn, "add_q_proj", None) is None:
        return getattr(attn, "to_out", None)
    add_out = getattr(attn, "to_add_out", None)
    return None if add_out is None else [add_out]


def _layers(layers: Any, x: torch.Tensor) -> torch.Tensor:
    if layers is not None:
        for layer in layers:
            x = layer(x)
    return x


def joint_flops(attn: torch.nn.Module, query_rows: int, image: int, text: int) -> int:
    """Matmul FLOPs per sample of a joint attention computing ``query_rows`` image queries (plus every
    text row) against ``image`` + ``text`` keys and values (FlopCounterMode's count: 2 x multiply-adds)."""

    def linear(name: str) -> int:
        layer = getattr(attn, name, None)
        return 2 * layer.in_features * layer.out_features if isinstance(layer, torch.nn.Linear) else 0

    def outputs(layers: Any) -> int:
        return sum(2 * m.in_features * m.out_features for m in (layers or ()) if isinstance(m, torch.nn.Linear))

    image_out = outputs(getattr(attn, "to_out", None))
    added = getattr(attn, "add_q_proj", None) is not None
    text_q = linear("add_q_proj" if added else "to_q") + outputs(_text_out(attn))
    text_kv = linear("add_k_proj") + linear("add_v_proj") if added else linear("to_k") + linear("to_v")
    pair = 4 * attn.to_q.out_features
    return (query_rows * (linear("to_q") + image_out) + image * (linear("to_k") + linear("to_v"))
            + text * (text_q + text_kv) + (query_rows + text) * (image + text) * pair)
