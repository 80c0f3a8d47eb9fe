"""DiT and PixArt-alpha/Sigma: `transformer_blocks` of diffusers' `BasicTransformerBlock`.

Each block runs `attn1` (self-attention), `attn2` (cross-attention, PixArt only) and `ff`, and
applies its own adaLN gates/shifts around them, so caching the module outputs caches the branch
output *before* the gate, as DuCa and L2C do. The processors have no rotary embedding, so
self-attention can be recomputed for selected queries against all keys and values.
"""

from __future__ import annotations

from .base import BlockListSpec, ModelAdapter, ModuleSpec

BASIC_BLOCK_MODULES = (
    ModuleSpec("attn1", "self_attention", partial_attention=True),
    ModuleSpec("attn2", "cross_attention"),
    ModuleSpec("ff", "mlp"),
)


class BasicTransformerAdapter(ModelAdapter):
    model_classes = {"DiTTransformer2DModel": "dit", "PixArtTransformer2DModel": "pixart"}
    block_lists = (BlockListSpec("transformer_blocks", BASIC_BLOCK_MODULES, value="attn1.to_v"),)
