"""HunyuanVideo (and HunyuanImage 2.1): double-stream `transformer_blocks`, then single-stream
`single_transformer_blocks`; the `token_refiner` of the text stream runs outside and is not cached.

Double blocks (`HunyuanVideoTransformerBlock`, and the token-replace variant of I2V) run a joint
attention `attn` over [image; text] that returns ``(h, e)`` (compute or reuse only: rotary
embeddings and a tuple output), then `ff` on the image stream and `ff_context` on the text stream.
Single blocks concatenate [image; text] and run `proj_mlp` and `proj_out` over those rows (recomputed
together, text rows always) around a pre-only joint `attn`. Every block is called positionally
``(h, e, temb, mask, rope, ...)`` and returns ``(h, e)``. The double blocks' `to_v` sees image rows
only; the single blocks' sees [image; text].
"""

from __future__ import annotations

from .base import BlockListSpec, ModelAdapter, ModuleSpec

_JOINT = ModuleSpec("attn", "joint_attention")

DOUBLE_BLOCKS = BlockListSpec(
    "transformer_blocks",
    (_JOINT, ModuleSpec("ff", "mlp"), ModuleSpec("ff_context", "text_mlp")),
    inputs="h,e", outputs="h,e", value="attn.to_v",
)
SINGLE_BLOCKS = BlockListSpec(
    "single_transformer_blocks",
    (_JOINT, ModuleSpec("proj_mlp", "single", text_rows="last", group="single"),
     ModuleSpec("proj_out", "single", text_rows="last", group="single")),
    inputs="h,e", outputs="h,e", value="attn.to_v", value_text_rows="last",
)

#: DuCa as the authors run it on HunyuanVideo (RESEARCH.md): cycles F,C,A,C,A, random tokens, ratio 0.1
# the authors' schedule, plus our order-1 forecast of reused outputs (as every DuCa preset here)
HUNYUAN_DUCA = dict(method="duca", interval=5, fresh_ratio=0.1, ratio_schedule="constant", selection="random",
                    aggressive="skip", forecast_order=1)


class HunyuanVideoAdapter(ModelAdapter):
    model_classes = {"HunyuanVideoTransformer3DModel": "hunyuan_video"}
    block_lists = (DOUBLE_BLOCKS, SINGLE_BLOCKS)
    timestep_arg = ("timestep", 1)  # forward(hidden_states, timestep, ...)
    presets = {"duca": HUNYUAN_DUCA}
