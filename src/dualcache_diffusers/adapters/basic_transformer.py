"""DiT and PixArt-alpha/Sigma: `transformer_blocks` of diffusers' `BasicTransformerBlock`.

Each block runs `attn1` (self-attention), `attn2` (cross-attention, PixArt only) and `ff`, and
applies its own adaLN gates/shifts around them, so caching the module outputs caches the branch
output *before* the gate, as DuCa and L2C do. The processors have no rotary embedding, so
self-attention can be recomputed for selected queries against all keys and values.
"""

from __future__ import annotations

import torch

from .base import BlockListSpec, ModelAdapter, ModuleSpec

BASIC_BLOCK_MODULES = (
    ModuleSpec("attn1", "self_attention", partial_attention=True),
    ModuleSpec("attn2", "cross_attention"),
    ModuleSpec("ff", "mlp"),
)


#: by the block's ``norm_type``, the norm whose output only ``attn1`` / ``ff`` reads (BasicTransformerBlock.forward:
#: DiT's adaLN-Zero modulates ``norm1.norm``'s rows for attn1 and ``norm3``'s for ff; PixArt's adaLN-single
#: modulates ``norm1``'s for attn1 and ``norm2``'s for ff, and hands attn2 the unnormed rows)
INPUT_NORMS = {
    "ada_norm_zero": {"attn1": "norm1.norm", "ff": "norm3"},
    "ada_norm_single": {"attn1": "norm1", "ff": "norm2"},
}


class BasicTransformerAdapter(ModelAdapter):
    model_classes = {"DiTTransformer2DModel": "dit", "PixArtTransformer2DModel": "pixart"}
    block_lists = (BlockListSpec("transformer_blocks", BASIC_BLOCK_MODULES, value="attn1.to_v"),)

    def input_norms(self, block: torch.nn.Module, spec: BlockListSpec) -> dict[str, str]:
        return basic_block_input_norms(block)


def basic_block_input_norms(block: torch.nn.Module) -> dict[str, str]:
    """The norms of a diffusers ``BasicTransformerBlock`` that only ``attn1`` / ``ff`` read, by its norm type."""
    if getattr(block, "_chunk_size", None) is not None:  # chunked feed-forward splits the rows ff gets
        return {}
    return INPUT_NORMS.get(getattr(block, "norm_type", None), {})
