"""Wan 2.1 / 2.2 (T2V, TI2V-5B, A14B with ``transformer_2``), Wan VACE and SkyReels-V2: one `blocks` list.

Each block runs `attn1` (self-attention over the video tokens with a rotary embedding), `attn2`
(cross-attention to the caption, plus image K/V for I2V) and `ffn`, applying its own adaLN
gates around them, and returns a tensor. `attn1` has RoPE, so it is computed or reused whole;
`attn2` and `ffn` may recompute a subset of rows. Wan VACE caches its main `blocks` only: the
`vace_blocks` (control hints) always run. Wan 2.2 A14B's two experts are both cached by the engine
(`transformer` and `transformer_2` share the pipeline's step counter).
"""

from __future__ import annotations

from .base import BlockListSpec, ModelAdapter, ModuleSpec

WAN_BLOCK_MODULES = (
    ModuleSpec("attn1", "self_attention"),  # rotary embedding: no partial self-attention
    ModuleSpec("attn2", "cross_attention"),
    ModuleSpec("ffn", "mlp"),
)


class WanAdapter(ModelAdapter):
    model_classes = {
        "WanTransformer3DModel": "wan",
        "WanVACETransformer3DModel": "wan",
        "SkyReelsV2Transformer3DModel": "wan",
    }
    block_lists = (BlockListSpec("blocks", WAN_BLOCK_MODULES, inputs="h,e", value="attn1.to_v"),)
    timestep_arg = ("timestep", 1)
    # token grid: latents (B, C, F, H, W) over the config's (t, h, w) `patch_size` (the default reading)
