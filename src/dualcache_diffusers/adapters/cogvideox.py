"""CogVideoX 1.0 and 1.5: `transformer_blocks` of `CogVideoXBlock`, joint [text; video] rows.

Each block runs the joint attention `attn1` (text and video together, rotary embeddings on the video
rows; returns ``(h, e)``: compute or reuse only), then one `ff` over cat(text, video), whose rows can
be recomputed for selected video tokens plus all text rows. `attn1.to_v` sees [text; video]. Blocks
are called with keywords and return ``(h, e)``. Latents are (B, F, C, H, W); CogVideoX 1.5 patches
``patch_size_t`` frames together.
"""

from __future__ import annotations

from .base import BlockListSpec, ModelAdapter, ModuleSpec


class CogVideoXAdapter(ModelAdapter):
    model_classes = {"CogVideoXTransformer3DModel": "cogvideox"}
    block_lists = (
        BlockListSpec(
            "transformer_blocks",
            (ModuleSpec("attn1", "joint_attention"), ModuleSpec("ff", "mlp", text_rows="first")),
            inputs="h,e", outputs="h,e", value="attn1.to_v", value_text_rows="first",
        ),
    )
    latent_layout = "BFCHW"  # the pipeline pads the latent frames to a multiple of patch_size_t
