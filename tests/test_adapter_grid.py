"""The token grid an adapter reads from a call: patch sizes from the config, as numbers or tuples."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dualcache_diffusers.adapters.base import ModelAdapter, patch_sizes

ATTRS = ("patch_size_t", "patch_size", "patch_size")


@pytest.mark.parametrize(
    "config, expected",
    [
        (dict(patch_size=2), (1, 2, 2)),  # DiT, Latte, Mochi: spatial only
        (dict(patch_size=2, patch_size_t=2), (2, 2, 2)),  # HunyuanVideo, Allegro, CogVideoX 1.5
        (dict(patch_size=2, patch_size_t=None), (1, 2, 2)),  # CogVideoX 1.0
        (dict(patch_size=(1, 2, 2)), (1, 2, 2)),  # Wan: (t, h, w)
        (dict(patch_size=(2, 4, 3)), (2, 4, 3)),
        (dict(patch_size=(4, 3)), (1, 4, 3)),  # (h, w)
        (dict(), (1, 1, 1)),
    ],
)
def test_patch_sizes(config, expected):
    assert patch_sizes(SimpleNamespace(**config), ATTRS) == expected


def test_patch_sizes_rejects_other_tuples():
    with pytest.raises(ValueError, match="patch_size"):
        patch_sizes(SimpleNamespace(patch_size=(1, 2, 2, 2)), ATTRS)


def _grid(adapter: ModelAdapter, config: dict, shape: tuple[int, ...]) -> tuple[int, int, int]:
    model = SimpleNamespace(config=SimpleNamespace(**config))
    return adapter.token_grid(model, (torch.zeros(shape),), {})


def test_token_grid_of_video_latents_with_a_tuple_patch_size():
    assert _grid(ModelAdapter(), dict(patch_size=(2, 2, 4)), (1, 16, 6, 8, 16)) == (3, 4, 4)


def test_token_grid_follows_the_latent_layout():
    class FramesFirst(ModelAdapter):
        latent_layout = "BFCHW"

    assert _grid(FramesFirst(), dict(patch_size=2, patch_size_t=2), (1, 4, 16, 8, 12)) == (2, 4, 6)
    assert _grid(ModelAdapter(), dict(patch_size=2), (1, 4, 8, 12)) == (1, 4, 6)
