"""Stable Diffusion 3 / 3.5: `transformer_blocks` of diffusers' MMDiT `JointTransformerBlock`.

Each block runs the joint attention `attn` over [image; text] (it returns the ``(image, text)``
tuple, so it is computed or reused whole), SD3.5's extra image self-attention `attn2` (only in the
blocks of ``dual_attention_layers``; its processor has no cross inputs, so no partial recompute),
the image MLP `ff` (token-wise: partial recompute of selected image rows) and the text MLP
`ff_context` (absent in the last, ``context_pre_only`` block). Blocks return ``(text, image)``; the
last one ``(None, image)``. `attn.to_v` projects the image rows only, so V-norm scores need no slicing.

The pipeline batches CFG as [uncond, cond] in one call; skip-layer guidance adds a third call of
batch size 1 at some steps, which the engine keeps as its own branch (keyed by batch size).
"""

from __future__ import annotations

from .base import BlockListSpec, ModelAdapter, ModuleSpec

#: JointTransformerBlock.forward: ``norm1.norm``'s modulated rows feed the joint attention and, in SD3.5's
#: dual-attention blocks (SD35AdaLayerNormZeroX, modulated again), ``attn2``; ``norm1_context.norm``
#: (AdaLayerNormZero, or AdaLayerNormContinuous in the ``context_pre_only`` block) feeds the joint attention; each
#: MLP reads its stream's ``norm2*`` rows. Every module's output goes to a residual, so nothing has a sole reader
INPUT_NORMS = {"attn": ("norm1.norm", "norm1_context.norm"), "attn2": "norm1.norm", "ff": "norm2",
               "ff_context": "norm2_context"}


class SD3Adapter(ModelAdapter):
    model_classes = {"SD3Transformer2DModel": "sd3"}
    block_lists = (
        BlockListSpec(
            "transformer_blocks",
            (
                ModuleSpec("attn", "joint_attention"),
                ModuleSpec("attn2", "self_attention"),
                ModuleSpec("ff", "mlp"),
                ModuleSpec("ff_context", "text_mlp"),
            ),
            inputs="h,e",
            outputs="e,h",
            value="attn.to_v",
            input_norms=INPUT_NORMS,
        ),
    )
    # SD3Transformer2DModel.forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, ...)
    timestep_arg = ("timestep", 3)
