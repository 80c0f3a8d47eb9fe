"""CogView4: `transformer_blocks` of `CogView4TransformerBlock`, joint [text; image] rows.

Each block runs the joint attention `attn1` (rotary embeddings on the image rows; returns
``(h, e)``: compute or reuse only), then calls the one `ff` twice: on the image rows, then on the
text rows. Each call has its own cache entry; only the image call recomputes selected rows, the
text call is computed or reused whole. `attn1.to_v` sees [text; image]. Blocks are called
positionally ``(h, e, temb, rope, mask, kwargs)`` and return ``(h, e)``.
"""

from __future__ import annotations

from .base import BlockListSpec, ModelAdapter, ModuleSpec

#: CogView4TransformerBlock.forward: ``norm1`` (CogView4AdaLayerNormZero, whose ``linear`` makes the gates from
#: ``temb``) runs its LayerNorms ``norm1.norm`` on the image rows and ``norm1.norm_context`` on the text rows,
#: modulated for `attn1` alone; ``norm2``'s and ``norm2_context``'s modulated rows feed `ff` alone (its image call,
#: then its text call). The residuals add to the unnormed rows; every module's output goes to a residual: no sole
#: readers
COGVIEW4_INPUT_NORMS = {"attn1": ("norm1.norm", "norm1.norm_context"), "ff": ("norm2", "norm2_context")}


class CogView4Adapter(ModelAdapter):
    model_classes = {"CogView4Transformer2DModel": "cogview4"}
    block_lists = (
        BlockListSpec(
            "transformer_blocks",
            (ModuleSpec("attn1", "joint_attention"), ModuleSpec("ff", "mlp", calls=("image", "text"))),
            inputs="h,e", outputs="h,e", value="attn1.to_v", value_text_rows="first",
            input_norms=COGVIEW4_INPUT_NORMS,
        ),
    )
