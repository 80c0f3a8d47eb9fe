"""QwenImage: `transformer_blocks` of `QwenImageTransformerBlock` (double stream, text first).

Each block modulates both streams (`img_mod`, `txt_mod`), runs the joint attention `attn` over
[text; image] (separate complex RoPE tables for the two streams; returns ``(image, text)``), then
`img_mlp` on image rows and `txt_mlp` on text rows, and returns ``(text, image)``. The attention
is computed or reused whole; the image MLP is row-wise.

Latents come packed, (B, N, C); the pipeline passes each sample's grid as ``img_shapes`` =
[[(frames, rows, cols), ...], ...] (edit pipelines append the reference images' grids).
"""

from __future__ import annotations

from math import prod
from typing import Any

import torch

from .base import BlockListSpec, ModelAdapter, ModuleSpec

#: QwenImageTransformerBlock.forward: ``img_norm1``'s and ``txt_norm1``'s rows, modulated (``_modulate``; with
#: ``modulate_index`` its per-token shift and scale broadcast one row back to every token: the same output, only the
#: norm saved), feed the joint `attn` alone; ``img_norm2``'s feed `img_mlp` alone and ``txt_norm2``'s `txt_mlp` alone.
#: The residuals add to the unnormed rows; every module's output goes to a residual: no sole readers
QWENIMAGE_INPUT_NORMS = {"attn": ("img_norm1", "txt_norm1"), "img_mlp": "img_norm2", "txt_mlp": "txt_norm2"}


class QwenImageAdapter(ModelAdapter):
    model_classes = {"QwenImageTransformer2DModel": "qwenimage"}
    block_lists = (
        BlockListSpec(
            "transformer_blocks",
            (ModuleSpec("attn", "joint_attention"), ModuleSpec("img_mlp", "mlp"), ModuleSpec("txt_mlp", "text_mlp")),
            inputs="h,e", outputs="e,h", value="attn.to_v", input_norms=QWENIMAGE_INPUT_NORMS,
        ),
    )
    # presets: the default ones (nothing published for QwenImage)

    def token_grid(self, model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int, int]:
        tokens = self.hidden_states(args, kwargs).shape[1]
        shapes = kwargs.get("img_shapes")
        try:
            sample = list(shapes[0])
            if len(sample) == 1 and prod(sample[0]) == tokens:
                frames, rows, cols = (int(v) for v in sample[0])
                return frames, rows, cols
        except (TypeError, IndexError, ValueError):
            pass
        return 1, 1, tokens  # several grids (edit references) or none given: one flat row of tokens
