"""CogVideoX 1.0 and 1.5: `transformer_blocks` of `CogVideoXBlock`, joint [text; video] rows.

Each block runs the joint attention `attn1` (text and video together, rotary embeddings on the video
rows; returns ``(h, e)``), then one `ff` over cat(text, video), whose rows can be recomputed for
selected video tokens plus all text rows. `attn1.to_v` sees [text; video]. Blocks are called with
keywords and return ``(h, e)``. Latents are (B, F, C, H, W); CogVideoX 1.5 patches ``patch_size_t``
frames together.

`CogVideoXAttnProcessor2_0` projects [text; video] with the same layers, norms per head, rotates the
video rows only with (N, D) tables, and projects both outputs with `to_out`: declared below, so
`self_attention="partial"` recomputes every text row plus the selected video rows as queries against
all keys and values. The presets reuse `attn1` whole at conservative steps.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from ..partial_attention import RotaryAttention
from .base import BlockListSpec, ModelAdapter, ModuleSpec


def apply_cogvideox_rotary(x: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """CogVideoXAttnProcessor2_0's rotary embedding, on (B, S, H, D) with (cos, sin) tables (N, D)."""
    return apply_rotary_emb(x, table, sequence_dim=1)


COGVIDEOX_ROTARY = RotaryAttention("image_rotary_emb", apply_cogvideox_rotary, token_axis=0, norm="heads",
                                   rope="heads", processors=("CogVideoXAttnProcessor2_0",), text="first",
                                   text_rope=False)


#: CogVideoXBlock.forward: ``norm1`` (CogVideoXLayerNormZero) runs its LayerNorm ``norm1.norm`` on the video and
#: the text rows, modulated for `attn1` alone (its gates come from ``norm1.linear``, not the rows); ``norm2.norm``'s
#: modulated rows, concatenated [text; video], feed `ff` alone. The residuals add to the unnormed rows
COGVIDEOX_INPUT_NORMS = {"attn1": "norm1.norm", "ff": "norm2.norm"}


class CogVideoXAdapter(ModelAdapter):
    model_classes = {"CogVideoXTransformer3DModel": "cogvideox"}
    block_lists = (
        BlockListSpec(
            "transformer_blocks",
            (ModuleSpec("attn1", "joint_attention", rotary=COGVIDEOX_ROTARY),
             ModuleSpec("ff", "mlp", text_rows="first")),
            inputs="h,e", outputs="h,e", value="attn1.to_v", value_text_rows="first",
            input_norms=COGVIDEOX_INPUT_NORMS,
        ),
    )
    latent_layout = "BFCHW"  # the pipeline pads the latent frames to a multiple of patch_size_t
