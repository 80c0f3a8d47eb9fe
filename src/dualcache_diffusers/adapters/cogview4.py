"""CogView4: `transformer_blocks` of `CogView4TransformerBlock`, joint [text; image] rows.

Each block runs the joint attention `attn1` (rotary embeddings on the image rows; returns
``(h, e)``: compute or reuse only), then calls the one `ff` twice: on the image rows, then on the
text rows. Each call has its own cache entry; only the image call recomputes selected rows, the
text call is computed or reused whole. `attn1.to_v` sees [text; image]. Blocks are called
positionally ``(h, e, temb, rope, mask, kwargs)`` and return ``(h, e)``.
"""

from __future__ import annotations

from .base import BlockListSpec, ModelAdapter, ModuleSpec


class CogView4Adapter(ModelAdapter):
    model_classes = {"CogView4Transformer2DModel": "cogview4"}
    block_lists = (
        BlockListSpec(
            "transformer_blocks",
            (ModuleSpec("attn1", "joint_attention"), ModuleSpec("ff", "mlp", calls=("image", "text"))),
            inputs="h,e", outputs="h,e", value="attn1.to_v", value_text_rows="first",
        ),
    )
