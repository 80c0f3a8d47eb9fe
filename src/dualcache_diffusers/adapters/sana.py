"""Sana: `transformer_blocks` of diffusers' `SanaTransformerBlock`.

Each block runs `attn1` (ReLU linear attention without rotary embedding), `attn2` (cross-attention
to the caption, partial recompute of selected rows) and `ff`, a
`GLUMBConv` whose 3x3 depthwise convolution runs on the (B, C, H, W) token grid: its output rows
depend on their neighbours, so `ff` is only ever computed or reused whole (``token_wise=False``).
Blocks take and return the image tokens only. CFG is batched [uncond, cond] in one call.

`attn1` recomputes selected queries against all rows exactly (the linear-attention processor takes
``encoder_hidden_states``), with ``self_attention="partial"``; the presets reuse it whole, as DuCa does.
Its FLOPs are priced as linear attention (``kernel="linear"``): the key-value summary is paid over
every row whatever the number of queries, so the engine's count of a partial step matches
``FlopCounterMode`` (priced as softmax attention it came out 4-9% low).
"""

from __future__ import annotations

from .base import BlockListSpec, ModelAdapter, ModuleSpec

#: SanaTransformerBlock.forward: ``norm1``'s rows, modulated by (scale_msa, shift_msa), feed ``attn1`` alone.
#: ``norm2``'s rows feed ``ff`` alone too, but the block unflattens them to the (height, width) grid before calling
#: it, which one row cannot take: not declared
SANA_INPUT_NORMS = {"attn1": "norm1"}


class SanaAdapter(ModelAdapter):
    model_classes = {"SanaTransformer2DModel": "sana"}
    block_lists = (
        BlockListSpec(
            "transformer_blocks",
            (
                ModuleSpec("attn1", "self_attention", partial_attention=True, kernel="linear"),
                ModuleSpec("attn2", "cross_attention"),
                ModuleSpec("ff", "mlp", token_wise=False),
            ),
            value="attn1.to_v",
            input_norms=SANA_INPUT_NORMS,
        ),
    )
