"""Competitor caches (`dualcache_diffusers.baselines`) on tiny DiT / PixArt pipelines."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, PixArtAlphaPipeline, PixArtTransformer2DModel
from tiny_pipelines import (
    TINY_PIXART_CALL_KWARGS,
    tiny_dit_pipeline,
    tiny_pixart_pipeline,
    tiny_t5_encoder,
    tiny_t5_tokenizer,
    tiny_vae,
)

from dualcache_diffusers.baselines import (
    BASELINES,
    apply_baseline,
    available_baselines,
    calibrate_mag_ratios,
    remove_baseline,
)

STEPS = 10
BUILDERS: dict[str, Callable[[], DiffusionPipeline]] = {
    "dit": tiny_dit_pipeline,
    "pixart": tiny_pixart_pipeline,
    "pixart_sigma": lambda: tiny_pixart_pipeline(variant="sigma"),
}
# Knobs aggressive enough that every baseline skips something in 10 tiny steps.
AGGRESSIVE: dict[str, dict[str, Any]] = {
    "fbcache": {"threshold": 0.5},
    "taylorseer": {},
    "magcache": {"threshold": 0.5},
    "pab": {},
    "fastercache": {},
    "seacache": {"threshold": 1.0},
    "cachedit_dbcache": {"residual_diff_threshold": 0.5, "max_warmup_steps": 2},
    "cachedit_dbcache_taylorseer": {"residual_diff_threshold": 0.5, "max_warmup_steps": 2},
    "cachedit_dbcache_foca": {"residual_diff_threshold": 0.5, "max_warmup_steps": 2},
}
# Knobs at the "never skip" end: the cached pipeline must reproduce the uncached one exactly.
CONSERVATIVE: dict[str, dict[str, Any]] = {
    "fbcache": {"threshold": 0.0},
    "taylorseer": {"disable_cache_before_step": STEPS},
    "magcache": {"threshold": 0.0},
    "pab": {"timestep_skip_range": (0, 0)},
    "fastercache": {"spatial_timestep_skip_range": (-1, -1), "uncond_timestep_skip_range": (-1, -1)},
    "seacache": {"threshold": 0.0},
    "cachedit_dbcache": {"residual_diff_threshold": 0.0},
    "cachedit_dbcache_taylorseer": {"residual_diff_threshold": 0.0},
    "cachedit_dbcache_foca": {"residual_diff_threshold": 0.0},
}


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread (conftest)


def _call_kwargs(pipe: DiffusionPipeline, steps: int = STEPS) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "num_inference_steps": steps,
        "generator": torch.manual_seed(0),
        "output_type": "np",
    }
    if isinstance(pipe.transformer, PixArtTransformer2DModel):
        return {"prompt": "a cat riding a horse", **TINY_PIXART_CALL_KWARGS, **kwargs}
    return {"class_labels": [1, 7], **kwargs}


def _generate(pipe: DiffusionPipeline, steps: int = STEPS) -> np.ndarray:
    return pipe(**_call_kwargs(pipe, steps)).images


@contextlib.contextmanager
def count_block_rows(pipe: DiffusionPipeline) -> Iterator[list[int]]:
    """Rows pushed through the Linear layers of the transformer blocks: proportional to block FLOPs, so it also sees
    FasterCache dropping half the batch, not only skipped calls."""
    rows = [0]

    def count(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        rows[0] += args[0].numel() // args[0].shape[-1]

    handles = [
        module.register_forward_pre_hook(count)
        for module in pipe.transformer.transformer_blocks.modules()
        if isinstance(module, torch.nn.Linear)
    ]
    try:
        yield rows
    finally:
        for handle in handles:
            handle.remove()


def _knobs(pipe: DiffusionPipeline, name: str, base: dict[str, Any]) -> dict[str, Any]:
    knobs = dict(base)
    if name == "magcache":
        knobs["mag_ratios"] = calibrate_mag_ratios(pipe, **_call_kwargs(pipe))
    return knobs


def _assert_no_traces(pipe: DiffusionPipeline) -> None:
    for name, module in pipe.transformer.named_modules():
        assert "_diffusers_hook" not in vars(module), name
        assert "forward" not in vars(module), name
    assert not any(key.startswith("_norm1_emb") for key in pipe.transformer.state_dict())
    assert "_original_call" not in vars(type(pipe))


CASES = [
    pytest.param(kind, name, id=f"{kind}-{name}")
    for kind in ("dit", "pixart")
    for name in BASELINES
    if name in available_baselines()
] + [pytest.param("pixart_sigma", "fbcache", id="pixart_sigma-fbcache")]


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_baseline_skips_compute_and_removes_cleanly(kind: str, name: str) -> None:
    pipe = BUILDERS[kind]()
    with count_block_rows(pipe) as rows:
        reference = _generate(pipe)
    full_rows = rows[0]

    handle = apply_baseline(pipe, name, **_knobs(pipe, name, AGGRESSIVE[name]))
    with count_block_rows(pipe) as rows:
        cached = _generate(pipe)
    cached_rows = rows[0]
    again = _generate(pipe)  # a second generation starts from fresh cache state
    remove_baseline(pipe, handle)
    restored = _generate(pipe)

    assert np.isfinite(cached).all()
    assert not np.array_equal(cached, reference), "the cache changed nothing"
    assert cached_rows < full_rows, f"{name} did not skip block compute ({cached_rows} vs {full_rows})"
    np.testing.assert_array_equal(again, cached)
    np.testing.assert_array_equal(restored, reference)
    _assert_no_traces(pipe)


@pytest.mark.parametrize("kind", ["dit", "pixart"])
@pytest.mark.parametrize("name", [n for n in CONSERVATIVE if n in available_baselines()])
def test_never_skipping_knobs_reproduce_uncached_output(kind: str, name: str) -> None:
    pipe = BUILDERS[kind]()
    reference = _generate(pipe)
    handle = apply_baseline(pipe, name, **_knobs(pipe, name, CONSERVATIVE[name]))
    try:
        np.testing.assert_array_equal(_generate(pipe), reference)
    finally:
        remove_baseline(pipe, handle)


@pytest.mark.parametrize("name", ["fbcache", "taylorseer", "pab", "seacache"])
def test_state_resets_between_generations_of_different_lengths(name: str) -> None:
    pipe = tiny_dit_pipeline()
    handle = apply_baseline(pipe, name, **AGGRESSIVE[name])
    _generate(pipe, steps=STEPS)
    after_other_run = _generate(pipe, steps=6)
    remove_baseline(pipe, handle)

    handle = apply_baseline(pipe, name, **AGGRESSIVE[name])
    fresh = _generate(pipe, steps=6)
    remove_baseline(pipe, handle)
    np.testing.assert_array_equal(after_other_run, fresh)


def test_calibrate_mag_ratios_one_ratio_per_step() -> None:
    pipe = tiny_dit_pipeline()
    ratios = calibrate_mag_ratios(pipe, **_call_kwargs(pipe))
    assert len(ratios) == STEPS
    assert ratios[0] == 1.0
    assert all(np.isfinite(ratios)) and all(r > 0 for r in ratios)
    assert "_diffusers_hook" not in vars(pipe.transformer.transformer_blocks[0])


def test_fastercache_with_pixart_additional_conditions() -> None:
    """PixArt-Alpha 1024 (sample_size 128) passes batched resolution/aspect-ratio tensors inside a dict that
    FasterCache cannot split when it drops the unconditional half; the baseline slices them for it."""
    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = tiny_t5_encoder(tokenizer)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=12,  # the size embedding needs a hidden size divisible by 3
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=128,
        patch_size=16,  # 8x8 tokens
        cross_attention_dim=24,
        caption_channels=32,
        norm_num_groups=4,
    ).eval()
    assert transformer.use_additional_conditions
    pipe = PixArtAlphaPipeline(tokenizer, text_encoder, tiny_vae(), transformer, DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)

    reference = _generate(pipe)
    handle = apply_baseline(pipe, "fastercache")
    cached = _generate(pipe)
    remove_baseline(pipe, handle)
    assert np.isfinite(cached).all() and not np.array_equal(cached, reference)
    np.testing.assert_array_equal(_generate(pipe), reference)


def test_errors() -> None:
    pipe = tiny_dit_pipeline()
    with pytest.raises(ValueError, match="allowed: fbcache, taylorseer"):
        apply_baseline(pipe, "teacache")
    with pytest.raises(ValueError, match="Unknown knob"):
        apply_baseline(pipe, "fbcache", thresh=0.1)
    with pytest.raises(ValueError, match="mag_ratios"):
        apply_baseline(pipe, "magcache")
    _assert_no_traces(pipe)

    handle = apply_baseline(pipe, "fbcache")
    with pytest.raises(ValueError, match="already applied"):
        apply_baseline(pipe, "pab")
    with pytest.raises(ValueError, match="different pipeline"):
        remove_baseline(tiny_dit_pipeline(), handle)
    remove_baseline(pipe, handle)
    remove_baseline(pipe, handle)  # idempotent
    _assert_no_traces(pipe)


def test_every_baseline_declares_its_sweep_knob() -> None:
    for name, spec in BASELINES.items():
        assert spec.name == name
        assert spec.sweep_knob in spec.defaults
        assert spec.faster_when in ("higher", "lower")


@pytest.mark.skipif("cachedit_dbcache" not in available_baselines(), reason="cache-dit is not installed")
def test_dbcache_calibrators_forecast_the_skipped_residual_instead_of_reusing_it() -> None:
    """cache-dit's TaylorSeer and FoCa calibrators change what DBCache's skipped steps use: at the same threshold,
    the three variants give three different images; an unknown calibrator is refused before anything is applied."""
    pipe = tiny_dit_pipeline()
    images = {}
    for name in ("cachedit_dbcache", "cachedit_dbcache_taylorseer", "cachedit_dbcache_foca"):
        handle = apply_baseline(pipe, name, **AGGRESSIVE[name])
        assert handle.knobs["calibrator"] == {"cachedit_dbcache": "none"}.get(name, name.rsplit("_", 1)[1])
        images[name] = _generate(pipe)
        remove_baseline(pipe, handle)
    plain, taylor, foca = images.values()
    assert not np.array_equal(plain, taylor) and not np.array_equal(plain, foca)
    assert not np.array_equal(taylor, foca)
    with pytest.raises(ValueError, match="calibrator='dmd' is not one of"):
        apply_baseline(pipe, "cachedit_dbcache", calibrator="dmd")
    _assert_no_traces(pipe)
