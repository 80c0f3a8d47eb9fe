"""AuraFlow: `joint_transformer_blocks` (MMDiT) then `single_transformer_blocks` on [register + text; image].

Joint blocks run the joint attention `attn` (returns ``(image, text)``), the image MLP `ff` and the
text MLP `ff_context`, and return ``(text, image)``. The model then concatenates the 8 register
tokens + text and the image tokens and hands the single blocks one stream, which each block returns
as one tensor; their `attn` (text and image attend together) is computed or reused whole, their `ff`
is row-wise over [text; image] rows. No rotary embedding (a learned position table is added once).
"""

from __future__ import annotations

from .base import BlockListSpec, ModelAdapter, ModuleSpec

#: AuraFlowJointTransformerBlock.forward: the joint `attn` reads the modulated rows of ``norm1.norm`` (image) and
#: ``norm1_context.norm`` (text), the FP32LayerNorms inside AdaLayerNormZero (whose ``linear`` makes the gates);
#: ``norm2`` norms ``residual + gate_msa * attn_output`` and its modulated rows feed `ff` alone (``norm2_context``:
#: `ff_context`). The block returns ``residual + gate_mlp * ff(...)`` (likewise for text): `attn`'s image output is
#: read by `ff`, its text output by `ff_context`, two readers, so it has no sole reader
JOINT_INPUT_NORMS = {"attn": ("norm1.norm", "norm1_context.norm"), "ff": "norm2", "ff_context": "norm2_context"}
#: AuraFlowSingleTransformerBlock.forward: `attn` reads ``norm1.norm``'s modulated rows, `ff` ``norm2``'s; `attn`'s
#: output goes nowhere but into ``norm2(residual + gate_msa * attn_output)`` (a broadcasting add takes one row), so
#: `ff` alone reads it: the block returns ``residual + gate_mlp * ff(...)``
SINGLE_INPUT_NORMS = {"attn": "norm1.norm", "ff": "norm2"}
SINGLE_SOLE_READERS = {"attn": "ff"}


class AuraFlowAdapter(ModelAdapter):
    model_classes = {"AuraFlowTransformer2DModel": "auraflow"}
    block_lists = (
        BlockListSpec(
            "joint_transformer_blocks",
            (ModuleSpec("attn", "joint_attention"), ModuleSpec("ff", "mlp"), ModuleSpec("ff_context", "text_mlp")),
            inputs="h,e", outputs="e,h", value="attn.to_v", input_norms=JOINT_INPUT_NORMS,
        ),
        BlockListSpec(
            "single_transformer_blocks",
            (ModuleSpec("attn", "joint_attention", text_rows="first"), ModuleSpec("ff", "mlp", text_rows="first")),
            value="attn.to_v", value_text_rows="first", input_norms=SINGLE_INPUT_NORMS,
            sole_readers=SINGLE_SOLE_READERS,
        ),
    )
    # presets: the default ones (nothing published for AuraFlow)
