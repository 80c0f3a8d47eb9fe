"""Shared fixtures: tiny DiT / PixArt pipelines large enough (64 tokens, 4 blocks) for the engine tests."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import pytest
import torch
from diffusers import (
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
)

sys.path.insert(0, str(Path(__file__).parent))

from tiny_pipelines import TINY_PIXART_CALL_KWARGS, tiny_dit_pipeline, tiny_t5_encoder, tiny_t5_tokenizer, tiny_vae

from dualcache_diffusers.reference.digits import DIGIT_WORDS

PIXART_KWARGS = TINY_PIXART_CALL_KWARGS


def engine_dit_pipeline(seed: int = 0, num_layers: int = 4) -> DiTPipeline:
    """DiT with 16x16 latents, patch 2 -> 64 tokens, width 64."""
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        sample_size=16,
        patch_size=2,
        num_embeds_ada_norm=1000,
    ).eval()
    pipe = DiTPipeline(
        transformer=transformer,
        vae=tiny_vae(seed),
        scheduler=DPMSolverMultistepScheduler(),
        id2label={i: str(i) for i in range(10)},
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def engine_pixart_pipeline(seed: int = 0, num_layers: int = 4) -> PixArtAlphaPipeline:
    """PixArt-alpha with 16x16 latents, patch 2 -> 64 tokens, width 64, a 1-layer T5."""
    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = tiny_t5_encoder(tokenizer)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        sample_size=16,
        patch_size=2,
        cross_attention_dim=64,
        caption_channels=32,
    ).eval()
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=tiny_vae(seed),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, steps: int = 20, seed: int = 0, batch: int = 2, **kwargs):
    """Images as a float numpy array, same call for DiT and PixArt."""
    generator = torch.Generator().manual_seed(seed)  # not the global one: threads may share this helper
    common = dict(num_inference_steps=steps, generator=generator, output_type="np", **kwargs)
    if isinstance(pipe, DiTPipeline):
        return pipe(class_labels=[1, 3, 5, 7][:batch], **common).images
    prompts = ["a red cat", "a dog on a tree", "a small house", "a blue car"][:batch]
    return pipe(prompts, **common, **PIXART_KWARGS).images


@pytest.fixture(params=["dit", "pixart"])
def pipe(request):
    return engine_dit_pipeline() if request.param == "dit" else engine_pixart_pipeline()


@pytest.fixture
def dit_pipe():
    return engine_dit_pipeline()


@pytest.fixture
def pixart_pipe():
    return engine_pixart_pipeline()


@contextlib.contextmanager
def _torch_threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def single_thread():
    """Tiny models run much faster single-threaded on a loaded CPU (use with pytest.mark.usefixtures)."""
    with _torch_threads(1):
        yield


@pytest.fixture(scope="module")
def single_thread_module():
    """The same for a whole module, its module-scoped fixtures included."""
    with _torch_threads(1):
        yield


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory) -> Path:
    """A tiny DiT saved like the shipped digits model: class names in model_index.json (save_pretrained drops them)."""
    path = tmp_path_factory.mktemp("tiny-dit")
    tiny_dit_pipeline().save_pretrained(path)
    index = json.loads((path / "model_index.json").read_text())
    index["id2label"] = {str(i): name for i, name in enumerate(DIGIT_WORDS)}
    (path / "model_index.json").write_text(json.dumps(index))
    return path
