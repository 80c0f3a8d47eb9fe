"""LTX-Video: `transformer_blocks` of `LTXVideoTransformerBlock` over packed video tokens.

Each block runs `attn1` (self-attention with a rotary embedding), `attn2` (cross-attention to the
caption) and `ff`, applying its own adaLN gates, and returns a tensor. `attn1` gets its rotary
embedding as ``image_rotary_emb=(cos, sin)`` of shape (B, S, D), applied by `LTXVideoAttnProcessor`
after the across-heads RMS norm and before splitting heads: declared below, so
`self_attention="partial"` recomputes selected queries against all keys and values with the tables
sliced to the selected rows. The DuCa preset still reuses `attn1` whole at conservative steps, as
published: with "partial" it saved under 2x FLOPs on the tiny test pipeline. `attn2` and `ff`
recompute a subset of rows. The latents reach the transformer packed as (B, F*H*W, C); the token
grid comes from the call's `num_frames` / `height` / `width` (latent sizes) over the patch sizes.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

from ..partial_attention import RotaryAttention
from .base import BlockListSpec, ModelAdapter, ModuleSpec

LTX_ROTARY = RotaryAttention("image_rotary_emb", apply_rotary_emb, token_axis=1, batch_axis=0, norm="inner",
                             rope="inner", processors=("LTXVideoAttnProcessor",))

LTX_BLOCK_MODULES = (
    ModuleSpec("attn1", "self_attention", rotary=LTX_ROTARY),
    ModuleSpec("attn2", "cross_attention"),
    ModuleSpec("ff", "mlp"),
)

_GRID_ARGS = ("num_frames", "height", "width")

#: LTXVideoTransformerBlock.forward: ``norm1``'s rows, modulated by (scale_msa, shift_msa), feed ``attn1`` alone and
#: ``norm2``'s, modulated by (scale_mlp, shift_mlp), ``ff`` alone; ``attn2`` reads the unnormed rows
LTX_INPUT_NORMS = {"attn1": "norm1", "ff": "norm2"}


class LTXVideoAdapter(ModelAdapter):
    model_classes = {"LTXVideoTransformer3DModel": "ltx"}
    block_lists = (BlockListSpec("transformer_blocks", LTX_BLOCK_MODULES, inputs="h,e", value="attn1.to_v",
                                 input_norms=LTX_INPUT_NORMS),)

    def token_grid(self, model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int, int]:
        """(frames, rows, cols) from the call's latent sizes; (1, 1, N) where they are missing or disagree."""
        tokens = self.hidden_states(args, kwargs).shape[1]
        sizes = [kwargs.get(name) for name in _GRID_ARGS]
        if any(size is None for size in sizes):  # positional: (h, e, timestep, mask, num_frames, height, width)
            sizes = list(args[4:7]) if len(args) >= 7 else []
        if len(sizes) == 3 and all(isinstance(size, int) for size in sizes):
            config = model.config
            pt, p = int(config.patch_size_t or 1), int(config.patch_size or 1)
            grid = (sizes[0] // pt, sizes[1] // p, sizes[2] // p)
            if grid[0] * grid[1] * grid[2] == tokens:
                return grid
        return 1, 1, tokens
