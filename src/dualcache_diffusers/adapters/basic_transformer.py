"""DiT and PixArt-alpha/Sigma: `transformer_blocks` of diffusers' `BasicTransformerBlock`.

Each block runs `attn1` (self-attention), `attn2` (cross-attention, PixArt only) and `ff`,
and applies its own adaLN gates/shifts around them, so caching the module outputs caches the
branch output *before* the gate, as DuCa and L2C do.
"""

from __future__ import annotations

import torch

from .base import ModelAdapter


class BasicTransformerAdapter(ModelAdapter):
    model_classes = {"DiTTransformer2DModel": "dit", "PixArtTransformer2DModel": "pixart"}
    self_attention_modules = ("attn1",)

    def blocks(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        return list(model.transformer_blocks)

    def module_names(self, model: torch.nn.Module) -> tuple[str, ...]:
        first = model.transformer_blocks[0]
        return tuple(name for name in ("attn1", "attn2", "ff") if getattr(first, name, None) is not None)

    def value_projection(self, block: torch.nn.Module):
        attn = block.attn1
        return attn.to_q, attn.to_k, attn.to_v, attn.heads

    def token_grid(self, model: torch.nn.Module, latents: torch.Tensor) -> tuple[int, int] | None:
        patch = model.config.patch_size
        return latents.shape[-2] // patch, latents.shape[-1] // patch
