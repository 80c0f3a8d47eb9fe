"""Allegro: `transformer_blocks` of `AllegroTransformerBlock` over (B, C, F, H, W) latents.

Each block runs `attn1` (self-attention with Allegro's 3D rotary embedding), `attn2`
(cross-attention to the caption) and `ff`, applying its own adaLN gates, and returns a tensor.
`attn1` has RoPE, so it is computed or reused whole; `attn2` and `ff` may recompute a subset of rows.
"""

from __future__ import annotations

from .base import BlockListSpec, ModelAdapter, ModuleSpec

ALLEGRO_BLOCK_MODULES = (
    ModuleSpec("attn1", "self_attention"),  # rotary embedding: no partial self-attention
    ModuleSpec("attn2", "cross_attention"),
    ModuleSpec("ff", "mlp"),
)


#: AllegroTransformerBlock.forward: ``norm1``'s rows, modulated, feed ``attn1`` alone and ``norm2``'s ``ff`` alone;
#: ``attn2`` reads the unnormed rows
ALLEGRO_INPUT_NORMS = {"attn1": "norm1", "ff": "norm2"}


class AllegroAdapter(ModelAdapter):
    model_classes = {"AllegroTransformer3DModel": "allegro"}
    block_lists = (BlockListSpec("transformer_blocks", ALLEGRO_BLOCK_MODULES, inputs="h,e", value="attn1.to_v",
                                 input_norms=ALLEGRO_INPUT_NORMS),)
