"""Latte: spatial and temporal `BasicTransformerBlock` lists, run interleaved (s0, t0, s1, t1, ...).

Spatial blocks see each frame's H'W' tokens (frames folded into the batch) and cross-attend to the
caption; temporal blocks see each position's F frames (positions folded into the batch). Both use
plain processors without rotary embeddings, so self-attention can be recomputed for selected queries.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .base import BlockListSpec, ModelAdapter, ModuleSpec
from .basic_transformer import basic_block_input_norms

_SELF = ModuleSpec("attn1", "self_attention", partial_attention=True)
_MLP = ModuleSpec("ff", "mlp")


class LatteAdapter(ModelAdapter):
    model_classes = {"LatteTransformer3DModel": "latte"}
    interleaved = True
    block_lists = (
        BlockListSpec("transformer_blocks", (_SELF, ModuleSpec("attn2", "cross_attention"), _MLP),
                      value="attn1.to_v", grid="space"),
        BlockListSpec("temporal_transformer_blocks", (_SELF, _MLP), value="attn1.to_v", grid="time"),
    )

    def input_norms(self, block: torch.nn.Module, spec: BlockListSpec) -> Mapping[str, str]:
        return basic_block_input_norms(block)  # both lists are BasicTransformerBlocks (adaLN-single)
