"""Cache memory: caches in the model's dtype, cache_device offloading, peak cache bytes next to the weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import engine_dit_pipeline, engine_pixart_pipeline, generate

from dualcache_diffusers import DualCacheConfig, cache_stats, enable_dual_cache
from dualcache_diffusers.api import get_engine
from dualcache_diffusers.cache_storage import CacheStorage
from dualcache_diffusers.engine import _tensors


def _states(pipe):
    """Every (branch, denoiser) ModelState of the pipeline's last generation in this thread."""
    generation = get_engine(pipe)._local.generation
    return [state for branch in generation.branches.values() for state in branch.models.values()]


def _cached_tensors(state) -> list[torch.Tensor]:
    values = [*state.module_cache.values(), state.stack_cache]
    values += [v for entries in [*state.history.values(), state.stack_history] for _, v in entries]
    return [t for value in values for t in _tensors(value)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_caches_and_forecast_history_are_kept_in_the_model_dtype(dtype):
    pipe = engine_dit_pipeline(num_layers=2)
    pipe.transformer.to(dtype)
    pipe.vae.to(dtype)
    enable_dual_cache(pipe, "duca", forecast_order=2)
    images = generate(pipe, steps=8)
    assert np.isfinite(images).all()
    states = _states(pipe)
    tensors = [t for state in states for t in _cached_tensors(state)]
    assert any(state.history for state in states) and len(tensors) > 10
    assert {t.dtype for t in tensors} == {dtype}
    # the peak counts every stored byte in that dtype (2 bytes per element), history included
    assert max(s.cache_bytes() for s in states) <= cache_stats(pipe).cache_bytes


def test_cache_stats_reports_peak_cache_bytes_next_to_the_weight_bytes():
    pipe = engine_dit_pipeline(num_layers=2)
    enable_dual_cache(pipe, "duca")
    generate(pipe, steps=6)
    stats = cache_stats(pipe)
    weights = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
    weights += sum(b.numel() * b.element_size() for b in pipe.transformer.buffers())
    assert stats.weight_bytes == weights
    # 2 blocks x (attn1 + ff outputs) x batch 2 x CFG 2 x 64 tokens x width 64 x fp32, twice for the history
    module_outputs = 2 * 2 * 4 * 64 * 64 * 4
    assert stats.cache_bytes >= 2 * module_outputs
    assert stats.as_dict()["weight_bytes"] == weights
    assert "model weights" in stats.summary() and f"{weights / 2**20:.2f} MiB" in stats.summary()


@pytest.mark.parametrize("value", [None, "same"])
def test_cache_device_same_is_the_default(value):
    assert DualCacheConfig(cache_device=value).cache_device is None
    assert DualCacheConfig(cache_device=torch.device("cpu")).cache_device == "cpu"
    assert DualCacheConfig(cache_device="cuda:1").cache_device == "cuda:1"


@pytest.mark.parametrize(("value", "error"), [("gpu", ValueError), ("meta", ValueError), (1, TypeError),
                                              ("cuda:x", ValueError)])
def test_a_bad_cache_device_is_refused_naming_it(value, error):
    with pytest.raises(error, match="cache_device"):
        DualCacheConfig(cache_device=value)
    pipe = engine_dit_pipeline(num_layers=1)
    with pytest.raises(error, match="cache_device"):
        enable_dual_cache(pipe, cache_device=value)
    assert get_engine(pipe) is None


class CountingStorage(CacheStorage):
    """Copies even host to host (as a CUDA model's offloading does) and counts prefetch hits."""

    def __init__(self) -> None:
        super().__init__("cpu", copy_always=True)
        self.hits = self.misses = self.puts = 0

    def _put_tensor(self, tensor):
        self.puts += 1
        return super()._put_tensor(tensor)

    def _get_tensor(self, prefetched, tensor, device):
        entry = prefetched.get(id(tensor))
        if entry is not None and entry[0] is tensor:
            self.hits += 1
        else:
            self.misses += 1
        return super()._get_tensor(prefetched, tensor, device)


def test_cache_device_cpu_on_a_cpu_model_stores_in_place():
    pipe = engine_dit_pipeline(num_layers=2)
    reference = (enable_dual_cache(pipe, "duca"), generate(pipe, steps=8))[1]
    enable_dual_cache(pipe, "duca", cache_device="cpu")
    engine = get_engine(pipe)
    t = torch.ones(3)
    assert engine.storage.offloads and engine.storage.put(t) is t  # nothing to move
    assert not engine.storage.offloads_from(torch.device("cpu"))  # nor any prefetch bookkeeping (test_compile)
    assert np.array_equal(generate(pipe, steps=8), reference)
    assert cache_stats(pipe).cache_device == "cpu" and "on cpu" in cache_stats(pipe).summary()


@pytest.mark.parametrize(
    ("make", "preset", "options"),
    [
        (engine_dit_pipeline, "duca", {}),  # forecasting preset: skip + partial steps from history
        (engine_dit_pipeline, "toca", {"self_attention": "partial"}),  # in-place scatter into the cache
        (engine_dit_pipeline, "fora", {"forecast_order": 0}),
        (engine_pixart_pipeline, "duca", {"forecast_order": 0, "aggressive": "reuse"}),
    ],
)
def test_offloaded_caches_give_exactly_the_default_outputs(make, preset, options):
    """Every stored feature is a separate copy on the cache device, read back through get/prefetch."""
    pipe = make(num_layers=2)
    enable_dual_cache(pipe, preset, **options)
    reference = generate(pipe, steps=9)
    reference_stats = cache_stats(pipe)
    enable_dual_cache(pipe, preset, cache_device="cpu", **options)
    engine = get_engine(pipe)
    engine.storage = storage = CountingStorage()
    outputs = []  # kept alive, so no stored copy can reuse their memory
    block = pipe.transformer.transformer_blocks[0]
    for module in (block.attn1, block.ff):
        module.register_forward_hook(lambda m, i, o: outputs.append(o))
    images = generate(pipe, steps=9)
    np.testing.assert_array_equal(images, reference)
    stats = cache_stats(pipe)
    assert stats.flops == reference_stats.flops and stats.cache_bytes == reference_stats.cache_bytes
    assert storage.puts > 0 and storage.hits > 0 and storage.misses == 0  # every read was prefetched
    computed = {o.data_ptr() for o in outputs if isinstance(o, torch.Tensor)}
    assert computed
    for state in _states(pipe):
        assert not state.prefetched or all(entry[1].device.type == "cpu" for entry in state.prefetched.values())
        stored = _cached_tensors(state)
        assert stored and all(t.device.type == "cpu" for t in stored)
        assert not computed & {t.data_ptr() for t in stored}  # copies, not the tensors the model returned


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cache_device_cpu_on_cuda_keeps_pinned_host_copies_and_the_outputs():
    pipe = engine_dit_pipeline(num_layers=2).to("cuda")
    enable_dual_cache(pipe, "duca")
    reference = generate(pipe, steps=9)
    enable_dual_cache(pipe, "duca", cache_device="cpu")
    np.testing.assert_array_equal(generate(pipe, steps=9), reference)
    stored = [t for state in _states(pipe) for t in _cached_tensors(state)]
    assert stored and all(t.device.type == "cpu" and t.is_pinned() for t in stored)


def test_the_meta_device_cache_accounting_of_benchmarks_cache_memory_matches_a_real_run():
    """benchmarks/cache_memory.py builds models on meta: its byte count equals the same model's real one."""
    from repo_files import load_repo_file

    bench = load_repo_file("benchmarks/cache_memory.py", "cache_memory_benchmark")
    config = dict(num_attention_heads=2, attention_head_dim=8, in_channels=16, out_channels=16, text_dim=16,
                  freq_dim=32, ffn_dim=32, num_layers=2, patch_size=(1, 2, 2), cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads")
    family = bench.Family("tiny-wan", "WanTransformer3DModel", config, "tiny", tokens=3 * 4 * 4, text=8,
                          inputs=lambda d: dict(hidden_states=bench._empty(1, 16, 3, 8, 8, dtype=d),
                                                timestep=bench._t(d),
                                                encoder_hidden_states=bench._empty(1, 8, 16, dtype=d)))
    on_meta = bench.measure(family, "duca", 6, torch.float32)

    from diffusers import WanTransformer3DModel

    from dualcache_diffusers.adapters import find_adapter

    torch.manual_seed(0)
    model = WanTransformer3DModel(**config).eval()
    assert "token_grid" not in vars(find_adapter(model))  # the shared adapter is left as it was
    pipe = bench._Pipeline(model, 6)
    enable_dual_cache(pipe, "duca")
    pipe.scheduler.set_timesteps(6)
    inputs = dict(hidden_states=torch.randn(1, 16, 3, 8, 8), encoder_hidden_states=torch.randn(1, 8, 16))
    with torch.no_grad(), model.cache_context("cond"):
        for step in range(6):
            model(**inputs, timestep=torch.tensor([900.0 - 100 * step]), return_dict=False)
    real = cache_stats(pipe)
    assert on_meta["pattern"] == "FCAFCA" and real.step_kinds == cache_stats(pipe).step_kinds
    assert on_meta["cache_bytes"] == 2 * real.cache_bytes > 0  # two CFG branches
    assert on_meta["weight_bytes"] == real.weight_bytes
