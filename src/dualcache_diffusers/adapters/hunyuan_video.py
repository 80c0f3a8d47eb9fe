"""HunyuanVideo (and HunyuanImage 2.1): double-stream `transformer_blocks`, then single-stream
`single_transformer_blocks`; the `token_refiner` of the text stream runs outside and is not cached.

Double blocks (`HunyuanVideoTransformerBlock`, and the token-replace variant of I2V) run a joint
attention `attn` over [image; text] that returns ``(h, e)``, then `ff` on the image stream and
`ff_context` on the text stream.
Single blocks concatenate [image; text] and run `proj_mlp` and `proj_out` over those rows (recomputed
together, text rows always) around a pre-only joint `attn`. Every block is called positionally
``(h, e, temb, mask, rope, ...)`` and returns ``(h, e)``. The double blocks' `to_v` sees image rows
only; the single blocks' sees [image; text].

Both attentions rotate the image rows only (tables (N, D), after the per-head RMS norms; the text
rows get `add_q/k/v_proj` and `norm_added_q/k` in double blocks, the image stream's layers in single
blocks) and mask padded text keys with a (B, 1, 1, N + T) mask: declared below, so
`self_attention="partial"` recomputes every text row plus the selected image rows as queries against
all keys and values; the single blocks' attention shares the selection of `proj_mlp` / `proj_out`.
The DuCa preset reuses the attention whole at conservative steps, as published.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from ..partial_attention import RotaryAttention
from .base import BlockListSpec, ModelAdapter, ModuleSpec


def apply_hunyuan_rotary(x: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """HunyuanVideoAttnProcessor2_0's rotary embedding of (B, S, H, D) with (cos, sin) tables (S, D)."""
    return apply_rotary_emb(x, table, sequence_dim=1)


#: HunyuanImage 2.1's processor computes the attention the same way
HUNYUAN_ROTARY = RotaryAttention("image_rotary_emb", apply_hunyuan_rotary, token_axis=0, norm="heads", rope="heads",
                                 processors=("HunyuanVideoAttnProcessor2_0", "HunyuanImageAttnProcessor"),
                                 text="last", text_rope=False, mask=True)

#: HunyuanVideoTransformerBlock.forward (and the token-replace block's, HunyuanImage 2.1's and HunyuanVideo 1.5's,
#: the same): the joint attention reads both streams' ``norm1*.norm`` rows (adaLN-modulated, in row slices by the
#: token-replace block), each MLP its stream's ``norm2*`` rows; every other output goes to a residual, so nothing
#: has a sole reader
DOUBLE_INPUT_NORMS = {"attn": ("norm1.norm", "norm1_context.norm"), "ff": "norm2", "ff_context": "norm2_context"}
#: HunyuanVideoSingleTransformerBlock.forward (and the token-replace one's): ``norm.norm``'s modulated rows feed
#: ``proj_mlp`` and, split into image / text rows, ``attn``. No sole readers: ``proj_out`` reads the attention's two
#: outputs concatenated along tokens, then along features with the MLP's, so one-row placeholders (two rows from
#: the attention's pair, one from the MLP) would not line up
SINGLE_INPUT_NORMS = {"proj_mlp": "norm.norm", "attn": "norm.norm"}

DOUBLE_BLOCKS = BlockListSpec(
    "transformer_blocks",
    (ModuleSpec("attn", "joint_attention", rotary=HUNYUAN_ROTARY), ModuleSpec("ff", "mlp"),
     ModuleSpec("ff_context", "text_mlp")),
    inputs="h,e", outputs="h,e", value="attn.to_v", input_norms=DOUBLE_INPUT_NORMS,
)
SINGLE_BLOCKS = BlockListSpec(
    "single_transformer_blocks",
    (ModuleSpec("attn", "joint_attention", group="single", rotary=HUNYUAN_ROTARY),
     ModuleSpec("proj_mlp", "single", text_rows="last", group="single"),
     ModuleSpec("proj_out", "single", text_rows="last", group="single")),
    inputs="h,e", outputs="h,e", value="attn.to_v", value_text_rows="last", input_norms=SINGLE_INPUT_NORMS,
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
