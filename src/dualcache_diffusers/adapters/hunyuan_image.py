"""HunyuanImage 2.1 (`HunyuanImageTransformer2DModel`): the HunyuanVideo block structure.

Double-stream `transformer_blocks` and single-stream `single_transformer_blocks` with the same modules,
rows and ``(h, e)`` returns as HunyuanVideo (see hunyuan_video.py); the `token_refiner` is not cached.
``patch_size`` is a tuple of 2 (image latents (B, C, H, W)) or 3 (the refiner's (B, C, F, H, W)).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import ModelAdapter
from .hunyuan_video import DOUBLE_BLOCKS, SINGLE_BLOCKS


class HunyuanImageAdapter(ModelAdapter):
    model_classes = {"HunyuanImageTransformer2DModel": "hunyuan_image"}
    block_lists = (DOUBLE_BLOCKS, SINGLE_BLOCKS)
    timestep_arg = ("timestep", 1)  # forward(hidden_states, timestep, ...)

    def token_grid(self, model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int, int]:
        latents = self.hidden_states(args, kwargs)
        patch = tuple(model.config.patch_size)
        if latents.ndim == 5:
            return latents.shape[2] // patch[-3], latents.shape[3] // patch[-2], latents.shape[4] // patch[-1]
        return 1, latents.shape[2] // patch[-2], latents.shape[3] // patch[-1]
