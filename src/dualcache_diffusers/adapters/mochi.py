"""Mochi: `transformer_blocks` of `MochiTransformerBlock`, joint attention over [video; text].

Each block runs `attn1` (`MochiAttention`: video and text projected separately, rotary embeddings
on video rows, per-sample valid text rows; returns ``(h, e)``: compute or reuse only), `ff` on the
video stream and `ff_context` on the text stream. The last block is ``context_pre_only``: it has no
`ff_context` and returns the text stream unchanged. `attn1.to_v` sees video rows only. Blocks are
called with keywords and return ``(h, e)``.
"""

from __future__ import annotations

from .base import BlockListSpec, ModelAdapter, ModuleSpec

#: MochiTransformerBlock.forward: ``attn1`` alone reads the video rows normed by ``norm1.norm`` (the plain RMSNorm in
#: MochiRMSNormZero, which also returns the gates, so not ``norm1`` itself) and the text rows normed by
#: ``norm1_context.norm`` (likewise; in the ``context_pre_only`` block the MochiModulatedRMSNorm of
#: MochiLayerNormContinuous, called with the text rows and its scale); ``ff`` alone reads ``norm3``'s rows and
#: ``ff_context`` ``norm3_context``'s (MochiModulatedRMSNorm: the rows normed and scaled, nothing else). The modules'
#: outputs are read by ``norm2*`` / ``norm4*`` (not cached modules): no sole readers
MOCHI_INPUT_NORMS = {"attn1": ("norm1.norm", "norm1_context.norm"), "ff": "norm3", "ff_context": "norm3_context"}


class MochiAdapter(ModelAdapter):
    model_classes = {"MochiTransformer3DModel": "mochi"}
    block_lists = (
        BlockListSpec(
            "transformer_blocks",
            (ModuleSpec("attn1", "joint_attention"), ModuleSpec("ff", "mlp"), ModuleSpec("ff_context", "text_mlp")),
            inputs="h,e", outputs="h,e", value="attn1.to_v", input_norms=MOCHI_INPUT_NORMS,
        ),
    )
