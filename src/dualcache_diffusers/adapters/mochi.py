"""Mochi: `transformer_blocks` of `MochiTransformerBlock`, joint attention over [video; text].

Each block runs `attn1` (`MochiAttention`: video and text projected separately, rotary embeddings
on video rows, per-sample valid text rows; returns ``(h, e)``: compute or reuse only), `ff` on the
video stream and `ff_context` on the text stream. The last block is ``context_pre_only``: it has no
`ff_context` and returns the text stream unchanged. `attn1.to_v` sees video rows only. Blocks are
called with keywords and return ``(h, e)``.
"""

from __future__ import annotations

from .base import BlockListSpec, ModelAdapter, ModuleSpec


class MochiAdapter(ModelAdapter):
    model_classes = {"MochiTransformer3DModel": "mochi"}
    block_lists = (
        BlockListSpec(
            "transformer_blocks",
            (ModuleSpec("attn1", "joint_attention"), ModuleSpec("ff", "mlp"), ModuleSpec("ff_context", "text_mlp")),
            inputs="h,e", outputs="h,e", value="attn1.to_v",
        ),
    )
