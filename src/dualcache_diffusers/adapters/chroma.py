"""Chroma: Flux's double-stream blocks, then single-stream blocks that see [text; image] rows directly.

`ChromaTransformerBlock` is laid out as Flux's double block (joint `attn`, `ff`, `ff_context`;
returns ``(text, image)``). `ChromaSingleTransformerBlock` takes the already concatenated
[text; image] rows as its only stream and returns them as one tensor. Latents are packed as in Flux.

`ChromaPipeline` calls the transformer once for the prompt and once for the negative prompt per
step without a `cache_context`, so the branches are told apart by the order of calls at a timestep.
"""

from __future__ import annotations

from .base import BlockListSpec
from .flux import (
    DOUBLE_INPUT_NORMS,
    DOUBLE_MODULES,
    SINGLE_INPUT_NORMS,
    SINGLE_MODULES,
    SINGLE_SOLE_READERS,
    FluxAdapter,
)


class ChromaAdapter(FluxAdapter):
    model_classes = {"ChromaTransformer2DModel": "chroma"}
    # the norms and what reads them as in Flux's blocks (ChromaTransformerBlock / ChromaSingleTransformerBlock)
    block_lists = (
        BlockListSpec("transformer_blocks", DOUBLE_MODULES, inputs="h,e", outputs="e,h", value="attn.to_v",
                      input_norms=DOUBLE_INPUT_NORMS),
        BlockListSpec("single_transformer_blocks", SINGLE_MODULES, value="attn.to_v", value_text_rows="first",
                      input_norms=SINGLE_INPUT_NORMS, sole_readers=SINGLE_SOLE_READERS),
    )
    branches_by_timestep = True
    # presets: Flux's (Chroma is a FLUX.1-schnell derivative; nothing is published for Chroma itself)
