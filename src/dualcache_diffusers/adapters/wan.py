"""Wan 2.1 / 2.2 (T2V, TI2V-5B, A14B with ``transformer_2``), Wan VACE and SkyReels-V2: one `blocks` list.

Each block runs `attn1` (self-attention over the video tokens with a rotary embedding), `attn2`
(cross-attention to the caption, plus image K/V for I2V) and `ffn`, applying its own adaLN
gates around them, and returns a tensor. `attn1` is called ``attn1(x, None, None, (cos, sin))``
with tables of shape (1, S, 1, D) that `WanAttnProcessor` applies per head after the across-heads
RMS norm: declared below, so `self_attention="partial"` recomputes selected queries against all keys
and values with the tables sliced to the selected rows (computed whole under SkyReels-V2's
diffusion-forcing attention mask). The DuCa preset still reuses `attn1` whole at conservative steps,
as published: with "partial" it saved under 2x FLOPs on the tiny test pipelines. `attn2` and `ffn`
recompute a subset of rows. Wan VACE caches its main `blocks` only: the `vace_blocks`
(control hints) always run. Wan 2.2 A14B's two experts are both cached by the engine
(`transformer` and `transformer_2` share the pipeline's step counter; each plans a budget over the steps
it runs, from the pipeline's ``boundary_ratio``).
"""

from __future__ import annotations

import torch

from ..partial_attention import RotaryAttention
from .base import BlockListSpec, ExpertSwitch, ModelAdapter, ModuleSpec


def apply_wan_rotary(x: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """WanAttnProcessor's rotary embedding of (B, S, H, D) with (cos, sin) tables (1, S, 1, D)."""
    freqs_cos, freqs_sin = table
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


WAN_ROTARY = RotaryAttention("rotary_emb", apply_wan_rotary, position=3, token_axis=1, batch_axis=0,
                             norm="inner", rope="heads", processors=("WanAttnProcessor", "SkyReelsV2AttnProcessor"))

WAN_BLOCK_MODULES = (
    ModuleSpec("attn1", "self_attention", rotary=WAN_ROTARY),
    ModuleSpec("attn2", "cross_attention"),
    ModuleSpec("ffn", "mlp"),
)

#: WanTransformerBlock.forward (and SkyReelsV2TransformerBlock.forward, the same): each module reads its own norm's
#: rows alone, adaLN-modulated for `attn1` (``norm1(h) * (1 + scale_msa) + shift_msa``) and `ffn` (``norm3``), as is
#: for `attn2` (``norm2``, an Identity without ``cross_attn_norm``); the residuals add to the unnormed rows
WAN_INPUT_NORMS = {"attn1": "norm1", "attn2": "norm2", "ffn": "norm3"}


class WanAdapter(ModelAdapter):
    model_classes = {
        "WanTransformer3DModel": "wan",
        "WanVACETransformer3DModel": "wan",
        "SkyReelsV2Transformer3DModel": "wan",
    }
    block_lists = (BlockListSpec("blocks", WAN_BLOCK_MODULES, inputs="h,e", value="attn1.to_v",
                                 input_norms=WAN_INPUT_NORMS),)
    timestep_arg = ("timestep", 1)
    # Wan 2.2 A14B: `transformer` (high noise) while t >= boundary_ratio x num_train_timesteps, then `transformer_2`
    expert_switch = ExpertSwitch("boundary_ratio", high="transformer", low="transformer_2")
    # token grid: latents (B, C, F, H, W) over the config's (t, h, w) `patch_size` (the default reading)
