"""Flux.1: double-stream `transformer_blocks` then single-stream `single_transformer_blocks`.

Double blocks (`FluxTransformerBlock`) run a joint attention `attn` over [text; image] that returns
``(image, text)``, the image MLP `ff` and the text MLP `ff_context`, and return ``(text, image)``.
Single blocks (`FluxSingleTransformerBlock`, diffusers 0.42) take ``(image, text)``, concatenate
them to [text; image] rows, run `proj_mlp` and the pre-only attention `attn` on those rows, mix
both with `proj_out`, and return ``(text, image)`` again. `proj_mlp` and `proj_out` are row-wise and
recompute the same rows (selected image rows plus every text row).

Both attentions apply one rotary table (S, D) over all [text; image] rows, after the per-head RMS
norms (`FluxAttnProcessor`); declared below, so `self_attention="partial"` recomputes every text row
plus the selected image rows as queries against all keys and values, with the table sliced to those
rows: the double blocks' selected image rows are scattered into the cached image output and their
text output is fresh; the single blocks' attention shares the selection of `proj_mlp` / `proj_out`.
The presets reuse the attention whole at conservative steps (DuCa and ToCa as published for FLUX).

Latents come packed, (B, N, C) with `img_ids` giving each token's (frame, row, col); the token
grid is read from `img_ids`.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb

from ..partial_attention import RotaryAttention
from .base import BlockListSpec, ModelAdapter, ModuleSpec


def apply_flux_rotary(x: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """FluxAttnProcessor's rotary embedding of (B, S, H, D) with (cos, sin) tables (S, D)."""
    return apply_rotary_emb(x, table, sequence_dim=1)


FLUX_ROTARY = RotaryAttention("image_rotary_emb", apply_flux_rotary, token_axis=0, norm="heads", rope="heads",
                              processors=("FluxAttnProcessor",), text="first", text_rope=True, mask=True)

DOUBLE_MODULES = (
    ModuleSpec("attn", "joint_attention", rotary=FLUX_ROTARY),
    ModuleSpec("ff", "mlp"),
    ModuleSpec("ff_context", "text_mlp"),
)
SINGLE_MODULES = (
    ModuleSpec("proj_mlp", "single", text_rows="first", group="single"),
    ModuleSpec("attn", "joint_attention", text_rows="first", group="single", rotary=FLUX_ROTARY),
    ModuleSpec("proj_out", "single", text_rows="first", group="single"),
)


def packed_token_grid(latents: torch.Tensor, img_ids: Any) -> tuple[int, int, int]:
    """(1, rows, cols) of packed latents (B, N, C) from their `img_ids` (N, 3) or (B, N, 3); (1, 1, N) if unsure."""
    tokens = latents.shape[1]
    if isinstance(img_ids, torch.Tensor) and img_ids.shape[-2:] == (tokens, 3):
        ids = img_ids.reshape(-1, tokens, 3)[0]
        rows = int(ids[:, 1].max() - ids[:, 1].min()) + 1
        cols = int(ids[:, 2].max() - ids[:, 2].min()) + 1
        if rows * cols == tokens:
            return 1, rows, cols
    return 1, 1, tokens


#: FluxTransformerBlock.forward: the joint attention reads both streams' ``norm1*`` rows (adaLN-modulated), each
#: MLP its stream's ``norm2*`` rows
DOUBLE_INPUT_NORMS = {"attn": ("norm1.norm", "norm1_context.norm"), "ff": "norm2", "ff_context": "norm2_context"}
#: FluxSingleTransformerBlock.forward: ``norm``'s modulated rows feed ``proj_mlp`` and ``attn``; their outputs
#: (the MLP's through its activation) are concatenated along features for ``proj_out`` alone
SINGLE_INPUT_NORMS = {"proj_mlp": "norm.norm", "attn": "norm.norm"}
SINGLE_SOLE_READERS = {"proj_mlp": "proj_out", "attn": "proj_out"}


class FluxAdapter(ModelAdapter):
    model_classes = {"FluxTransformer2DModel": "flux"}
    block_lists = (
        BlockListSpec("transformer_blocks", DOUBLE_MODULES, inputs="h,e", outputs="e,h", value="attn.to_v",
                      input_norms=DOUBLE_INPUT_NORMS),
        BlockListSpec("single_transformer_blocks", SINGLE_MODULES, inputs="h,e", outputs="e,h",
                      value="attn.to_v", value_text_rows="first", input_norms=SINGLE_INPUT_NORMS,
                      sole_readers=SINGLE_SOLE_READERS),
    )
    # FLUX.1-dev settings of the authors' papers (RESEARCH.md): DuCa N=5 (FoCa table, 3.80x), ToCa5
    # (ToCa README, 3.14x), FORA N=3 (FoCa table, 2.82x). Fresh ratios: ours (not published for FLUX);
    # DuCa forecasts reused outputs at order 1, as every DuCa preset here (ours).
    presets = {
        "duca": dict(method="duca", interval=5, fresh_ratio=0.3, ratio_schedule="constant", selection="vnorm",
                     aggressive="skip", forecast_order=1),
        "toca": dict(method="toca", interval=5, fresh_ratio=0.3, ratio_schedule="constant", selection="vnorm"),
        "fora": dict(method="fora", interval=3),
    }

    shared_inputs = ("img_ids", "txt_ids")  # (N, 3) / (T, 3) position ids, the same for every sample

    def token_grid(self, model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int, int]:
        return packed_token_grid(self.hidden_states(args, kwargs), kwargs.get("img_ids"))
