"""AuraFlow: `joint_transformer_blocks` (MMDiT) then `single_transformer_blocks` on [register + text; image].

Joint blocks run the joint attention `attn` (returns ``(image, text)``), the image MLP `ff` and the
text MLP `ff_context`, and return ``(text, image)``. The model then concatenates the 8 register
tokens + text and the image tokens and hands the single blocks one stream, which each block returns
as one tensor; their `attn` (text and image attend together) is computed or reused whole, their `ff`
is row-wise over [text; image] rows. No rotary embedding (a learned position table is added once).
"""

from __future__ import annotations

from .base import BlockListSpec, ModelAdapter, ModuleSpec


class AuraFlowAdapter(ModelAdapter):
    model_classes = {"AuraFlowTransformer2DModel": "auraflow"}
    block_lists = (
        BlockListSpec(
            "joint_transformer_blocks",
            (ModuleSpec("attn", "joint_attention"), ModuleSpec("ff", "mlp"), ModuleSpec("ff_context", "text_mlp")),
            inputs="h,e", outputs="e,h", value="attn.to_v",
        ),
        BlockListSpec(
            "single_transformer_blocks",
            (ModuleSpec("attn", "joint_attention", text_rows="first"), ModuleSpec("ff", "mlp", text_rows="first")),
            value="attn.to_v", value_text_rows="first",
        ),
    )
    # presets: the default ones (nothing published for AuraFlow)
