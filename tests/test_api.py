"""The public surface: bad input errors, DualCachePipeline.from_pretrained, re-enabling."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import generate
from diffusers import DDPMPipeline, DDPMScheduler, DiTPipeline, PixArtAlphaPipeline, UNet2DModel
from tiny_pipelines import tiny_dit_pipeline, tiny_pixart_pipeline

from dualcache_diffusers import (
    DualCacheConfig,
    DualCachePipeline,
    cache_stats,
    disable_dual_cache,
    enable_dual_cache,
    supported_models,
)
from dualcache_diffusers.api import get_engine
from dualcache_diffusers.plan import PlanLayout

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread (conftest)


def _tiny_unet_pipeline() -> DDPMPipeline:
    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 8),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler())


def _has_hooks(pipe) -> bool:
    return any(hasattr(m, "_diffusers_hook") for m in pipe.transformer.modules())


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(config="nope"), ValueError, ["config='nope'", "'duca'", "'fora'"]),
        (dict(config=3), TypeError, ["config", "DualCacheConfig", "int"]),
        (dict(selection="bogus"), ValueError, ["selection='bogus'", "'vnorm'", "'random'", "'attention'"]),
        (dict(fresh_ratio=1.5), ValueError, ["fresh_ratio=1.5", "[0.0, 1.0]"]),
        (dict(fresh_ratio=-0.1), ValueError, ["fresh_ratio=-0.1", "[0.0, 1.0]"]),
        (dict(fresh_ratio=float("nan")), TypeError, ["fresh_ratio", "nan"]),
        (dict(interval=0), ValueError, ["interval=0", "[1, 1000]"]),
        (dict(interval=2.5), TypeError, ["interval", "integer", "2.5"]),
        (dict(aggressive="everything"), ValueError, ["aggressive='everything'", "'skip'", "'reuse'"]),
        (dict(self_attention="x"), ValueError, ["self_attention='x'", "'reuse'", "'partial'"]),
        (dict(ratio_schedule="x"), ValueError, ["ratio_schedule='x'", "'dit'"]),
        (dict(colour="red"), TypeError, ["colour", "interval", "fresh_ratio"]),
    ],
)
def test_bad_input_raises_before_anything_is_hooked(kwargs, error, words):
    pipe = tiny_dit_pipeline()
    with pytest.raises(error) as info:
        enable_dual_cache(pipe, **kwargs)
    for word in words:
        assert word in str(info.value)
    assert not _has_hooks(pipe) and get_engine(pipe) is None


def test_failed_enable_keeps_the_previous_cache():
    pipe = tiny_dit_pipeline()
    enable_dual_cache(pipe, "fora", interval=2)
    engine = get_engine(pipe)
    with pytest.raises(ValueError):
        enable_dual_cache(pipe, interval=0)
    assert get_engine(pipe) is engine and engine.config.method == "fora"


def test_unet_pipeline_and_unknown_transformer_are_refused():
    pipe = _tiny_unet_pipeline()
    with pytest.raises(TypeError, match=r"DDPMPipeline.*UNet2DModel"):
        enable_dual_cache(pipe)
    with pytest.raises(TypeError, match=r"UNet2DModel has no dual-cache adapter.*DiTTransformer2DModel"):
        enable_dual_cache(pipe.unet)
    assert not any(hasattr(m, "_diffusers_hook") for m in pipe.unet.modules())


def test_plan_for_another_model_is_refused():
    plan = DualCacheConfig("fora").build_plan(10, PlanLayout.uniform_layout(5, ("attn1", "ff")))
    pipe = tiny_dit_pipeline()
    with pytest.raises(ValueError, match="plan is for 5 blocks"):
        enable_dual_cache(pipe, plan=plan)
    assert not _has_hooks(pipe)


def test_plan_with_another_step_count_is_an_explained_error():
    pipe = tiny_dit_pipeline()
    plan = DualCacheConfig("fora").build_plan(10, PlanLayout.uniform_layout(2, ("attn1", "ff")))
    enable_dual_cache(pipe, plan=plan)
    assert generate(pipe, steps=10).shape[0] == 2
    with pytest.raises(ValueError, match="made for 10 denoiser calls but this generation makes 12"):
        generate(pipe, steps=12)


def test_enabling_twice_replaces_the_cache():
    pipe = tiny_dit_pipeline()
    enable_dual_cache(pipe, "toca")
    enable_dual_cache(pipe, "fora")
    generate(pipe, steps=9)
    assert set(cache_stats(pipe).step_counts) == {"full", "aggressive"}
    registries = [m._diffusers_hook for m in pipe.transformer.modules() if hasattr(m, "_diffusers_hook")]
    assert all(len(r.hooks) == 1 for r in registries)  # no leftover hooks of the first engine


def test_enable_returns_the_effective_config_with_family_preset():
    dit = enable_dual_cache(tiny_dit_pipeline())
    pixart = enable_dual_cache(tiny_pixart_pipeline(), fresh_ratio=0.2)
    assert dit.ratio_schedule == "pixart" and dit.spatial_grid == 2 and dit.fresh_ratio == 0.06
    assert pixart.ratio_schedule == "pixart" and pixart.fresh_ratio == 0.2


def test_cache_stats_needs_an_enabled_cache():
    with pytest.raises(RuntimeError, match="enable_dual_cache"):
        cache_stats(tiny_dit_pipeline())


def test_supported_models_lists_dit_and_pixart():
    assert {"DiTTransformer2DModel", "PixArtTransformer2DModel"} <= set(supported_models())


@pytest.mark.parametrize("variant", ["dit", "pixart-alpha", "pixart-sigma"])
def test_dual_cache_pipeline_loads_a_saved_pipeline_with_caching_on(tmp_path, variant):
    original = tiny_dit_pipeline() if variant == "dit" else tiny_pixart_pipeline(variant=variant.split("-")[1])
    original.save_pretrained(tmp_path)
    pipe = DualCachePipeline.from_pretrained(tmp_path, cache="fora", cache_options={"interval": 2})
    assert type(pipe) is type(original)
    assert get_engine(pipe).config.method == "fora" and get_engine(pipe).config.interval == 2
    pipe.set_progress_bar_config(disable=True)
    cached = generate(pipe, steps=6)
    assert cache_stats(pipe).step_counts == {"full": 3, "aggressive": 3}
    enable_dual_cache(original, "fora", interval=2)
    np.testing.assert_allclose(cached, generate(original, steps=6), atol=1e-6)
    # cache=None loads the stock pipeline untouched
    assert get_engine(DualCachePipeline.from_pretrained(tmp_path, cache=None)) is None


def test_dual_cache_pipeline_refuses_unsupported_directories_before_loading(tmp_path):
    _tiny_unet_pipeline().save_pretrained(tmp_path / "unet")
    with pytest.raises(TypeError, match="has no transformer"):
        DualCachePipeline.from_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="cache='fast'"):
        DualCachePipeline.from_pretrained(tmp_path / "unet", cache="fast")


def test_dual_cache_pipeline_accepts_a_config_object(tmp_path):
    tiny_pixart_pipeline().save_pretrained(tmp_path)
    pipe = DualCachePipeline.from_pretrained(tmp_path, cache=DualCacheConfig("toca", interval=2))
    assert isinstance(pipe, PixArtAlphaPipeline) and get_engine(pipe).config.method == "toca"
    disable_dual_cache(pipe)
    assert not _has_hooks(pipe)


def test_dual_cache_pipeline_loads_the_shipped_dit_with_its_labels():
    from dualcache_diffusers.reference.digits import DIT_DIGITS_DIR

    pipe = DualCachePipeline.from_pretrained(DIT_DIGITS_DIR)
    assert isinstance(pipe, DiTPipeline) and get_engine(pipe).config.spatial_grid == 2
    assert pipe.get_label_ids(["three", "seven"]) == [3, 7]
