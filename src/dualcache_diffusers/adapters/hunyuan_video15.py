"""HunyuanVideo 1.5 (`HunyuanVideo15Transformer3DModel`): double-stream blocks only.

`transformer_blocks` of `HunyuanVideo15TransformerBlock` have HunyuanVideo's double-block modules
(joint `attn` -> ``(h, e)``, `ff`, `ff_context`; see hunyuan_video.py), called positionally
``(h, e, temb, mask, rope)`` and returning ``(h, e)``; the text stream is [image-embedding tokens;
ByT5 glyph tokens; MLLM tokens], refined outside the blocks. No single-stream blocks.
"""

from __future__ import annotations

from .base import ModelAdapter
from .hunyuan_video import DOUBLE_BLOCKS


class HunyuanVideo15Adapter(ModelAdapter):
    model_classes = {"HunyuanVideo15Transformer3DModel": "hunyuan_video15"}
    block_lists = (DOUBLE_BLOCKS,)
    timestep_arg = ("timestep", 1)  # forward(hidden_states, timestep, ...)
