"""What an adapter tells the engine about one model family."""

from __future__ import annotations

from typing import Any

import torch


class ModelAdapter:
    """Subclass per model family; the engine only talks to this interface."""

    #: class names of the denoisers this adapter handles, mapped to their preset family
    model_classes: dict[str, str] = {}
    #: cached module names inside each block whose attention mixes tokens (partial = query subset)
    self_attention_modules: tuple[str, ...] = ()

    def supports(self, model: torch.nn.Module) -> bool:
        return type(model).__name__ in self.model_classes

    def family(self, model: torch.nn.Module) -> str:
        return self.model_classes[type(model).__name__]

    def blocks(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        raise NotImplementedError

    def module_names(self, model: torch.nn.Module) -> tuple[str, ...]:
        """Names of the token-wise cached submodules of every block, in execution order."""
        raise NotImplementedError

    def value_projection(self, block: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module, int]:
        """(to_q, to_k, to_v, heads) of the block's self-attention, recorded at full steps for scoring."""
        raise NotImplementedError

    def hidden_states(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        """The denoiser's latent input, for detecting new generations and CFG pairing."""
        return args[0] if args else kwargs["hidden_states"]

    def token_grid(self, model: torch.nn.Module, latents: torch.Tensor) -> tuple[int, int] | None:
        """(rows, cols) of the image-token grid, for the spatial bonus; None if not a 2D grid."""
        return None
