"""Lumina-Image 2.0: `context_refiner` (text only), `noise_refiner` (image only), then `layers` (joint).

All three lists hold `Lumina2TransformerBlock`s that take one stream and return one tensor, with
`attn` (self-attention with RoPE, so computed or reused whole) and the row-wise `feed_forward`.
The context refiner sees caption rows only and does not depend on the timestep: its `attn` is
cached (reused whole) and its `feed_forward` is the caption's MLP (role ``text_mlp``: computed at
conservative steps, reused at aggressive ones), while the same name is the image MLP of the other
lists (roles are per block, see ``PlanLayout.block_roles``). The noise refiner sees the
image rows; the main `layers` see each sample's [caption; image; padding] rows, with the caption's
true length taken from the mask. A batch whose captions have different lengths puts the image rows
of each sample at another offset, which one `text_rows` layout cannot describe: the adapter refuses
it (one prompt per call, as the pipeline's two CFG calls are, always works).

`Lumina2Pipeline` calls the transformer for the prompt, then for the negative prompt, without a
`cache_context`, and stops the second call after `cfg_trunc_ratio`: branches are told apart by the
order of calls at a timestep.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import BlockListSpec, ModelAdapter, ModuleSpec

_ATTN = ModuleSpec("attn", "self_attention")  # RoPE: no partial queries

#: Lumina2TransformerBlock.forward: `attn` alone reads ``norm1``'s rows (as query and key/value source) and
#: `feed_forward` alone ``ffn_norm1``'s (diffusers' RMSNorm). With ``modulation`` (the noise refiner and the main
#: layers) ``norm1`` is LuminaRMSNormZero, which also makes the gates from ``temb``: its RMSNorm ``norm1.norm``, the
#: rows scaled by ``1 + scale_msa`` (``ffn_norm1``'s by ``1 + scale_mlp``); the context refiner has none, and ``norm1``
#: is a plain RMSNorm. ``norm2`` / ``ffn_norm2`` norm the modules' outputs for the residuals: no sole readers
MODULATED_INPUT_NORMS = {"attn": "norm1.norm", "feed_forward": "ffn_norm1"}
CONTEXT_INPUT_NORMS = {"attn": "norm1", "feed_forward": "ffn_norm1"}


class Lumina2Adapter(ModelAdapter):
    model_classes = {"Lumina2Transformer2DModel": "lumina2"}
    block_lists = (
        BlockListSpec("context_refiner",
                      (ModuleSpec("attn", "joint_attention"), ModuleSpec("feed_forward", "text_mlp")),
                      input_norms=CONTEXT_INPUT_NORMS),
        BlockListSpec("noise_refiner", (_ATTN, ModuleSpec("feed_forward", "mlp")), value="attn.to_v",
                      input_norms=MODULATED_INPUT_NORMS),
        BlockListSpec("layers", (ModuleSpec("attn", "joint_attention", text_rows="first"),
                                 ModuleSpec("feed_forward", "mlp", text_rows="first")),
                      value="attn.to_v", value_text_rows="first", input_norms=MODULATED_INPUT_NORMS),
    )
    branches_by_timestep = True
    timestep_arg = ("timestep", 1)
    # presets: the default ones (nothing published for Lumina2)

    def token_grid(self, model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int, int]:
        mask = kwargs.get("encoder_attention_mask")
        if mask is None and len(args) > 3:
            mask = args[3]
        if isinstance(mask, torch.Tensor) and mask.ndim == 2 and mask.shape[0] > 1:
            lengths = mask.sum(dim=1)
            if bool((lengths != lengths[0]).any()):
                raise ValueError(
                    f"dual cache on Lumina2: the captions of one batch have different lengths {lengths.tolist()}, so "
                    "each sample's image rows sit at another offset; call the transformer with one caption length "
                    "per batch (the pipeline does with one prompt per call) or disable the cache"
                )
        return super().token_grid(model, args, kwargs)
