"""Issue 12's silent-wrong-result cases: one generation's state, whatever threads, schedulers and hooks do."""

from __future__ import annotations

import gc
import logging
import threading

import numpy as np
import pytest
import torch
from conftest import engine_dit_pipeline, engine_pixart_pipeline, generate
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

from dualcache_diffusers import DualCacheConfig, disable_dual_cache, enable_dual_cache
from dualcache_diffusers.api import get_engine
from dualcache_diffusers.baselines import apply_baseline, remove_baseline
from dualcache_diffusers.plan import fora_plan


@pytest.fixture
def dit():
    return engine_dit_pipeline(num_layers=3)


def test_scheduler_replaced_after_enabling_is_followed(dit):
    enable_dual_cache(dit)
    generate(dit, steps=8)
    dit.scheduler = DPMSolverMultistepScheduler.from_config(dit.scheduler.config)
    a = generate(dit, steps=8)
    b = generate(dit, steps=8)
    assert np.array_equal(a, b)
    engine = get_engine(dit)
    assert engine.stats().num_steps == 8  # a plan for the new scheduler's 8 steps, not its 1000 training steps


def test_threads_sharing_one_cached_pipeline_get_their_own_images(dit):
    dit.scheduler = DDIMScheduler()  # stateless between steps, so the stock pipeline is thread-safe with it
    enable_dual_cache(dit, "toca")
    seeds = list(range(6))
    expected = {seed: generate(dit, steps=10, seed=seed, batch=1) for seed in seeds}
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def work(my_seeds):
        barrier.wait()
        try:
            for seed in my_seeds:
                results[seed] = generate(dit, steps=10, seed=seed, batch=1)
        except BaseException as error:  # collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(seeds[i::3],)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    wrong = [seed for seed in seeds if not np.array_equal(results[seed], expected[seed])]
    assert not wrong, f"images of seeds {wrong} differ from the single-threaded ones"


def test_diffusers_cache_added_after_enabling_is_refused_and_disable_restores_stock(dit):
    stock = generate(dit, steps=6)
    enable_dual_cache(dit)
    handle = apply_baseline(dit, "fbcache", threshold=0.2)
    with pytest.raises(RuntimeError, match="two feature caches cannot share"):
        generate(dit, steps=6)
    disable_dual_cache(dit)
    with_fbc = generate(dit, steps=6)
    remove_baseline(dit, handle)
    assert np.array_equal(generate(dit, steps=6), stock)
    # the baseline alone still works after our hooks were removed from under it
    handle = apply_baseline(dit, "fbcache", threshold=0.2)
    assert np.array_equal(generate(dit, steps=6), with_fbc)
    remove_baseline(dit, handle)


def test_enable_on_a_model_with_a_diffusers_cache_is_refused_before_touching_it(dit):
    apply_first_block_cache(dit.transformer, FirstBlockCacheConfig(threshold=0.2))
    with pytest.raises(ValueError, match="cannot be combined"):
        enable_dual_cache(dit)
    assert get_engine(dit) is None
    for module in dit.transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        assert registry is None or not any(n.startswith("dualcache") for n in registry.hooks)


def test_bare_transformer_called_with_another_step_count_raises(dit):
    enable_dual_cache(dit.transformer, num_inference_steps=10)
    generate(dit, steps=6)  # 6 of the 10 planned calls: cannot be told apart from a generation in progress...
    with pytest.raises(RuntimeError, match="restarts"):  # ...until the next one starts over
        generate(dit, steps=6)


def test_bare_transformer_with_matching_steps_runs_and_repeats(dit):
    enable_dual_cache(dit.transformer, num_inference_steps=6)
    a = generate(dit, steps=6)
    assert np.array_equal(generate(dit, steps=6), a)


@pytest.fixture
def pixart():
    return engine_pixart_pipeline(num_layers=3)


def test_fused_qkv_falls_back_to_random_selection_with_a_warning(pixart, caplog):
    reference = generate(pixart, steps=8)
    pixart.transformer.fuse_qkv_projections()
    with caplog.at_level(logging.WARNING):
        enable_dual_cache(pixart, "toca")
        out = generate(pixart, steps=8)
    assert "fused" in caplog.text and "random" in caplog.text
    assert np.isfinite(out).all() and not np.array_equal(out, reference)


def test_fusing_qkv_after_enabling_also_falls_back(pixart, caplog):
    enable_dual_cache(pixart, "toca")
    pixart.transformer.fuse_qkv_projections()
    with caplog.at_level(logging.WARNING):
        out = generate(pixart, steps=8)
    assert np.isfinite(out).all() and "fused" in caplog.text


def test_backward_through_a_cached_call_works(dit):
    model = dit.transformer
    enable_dual_cache(model, "toca", num_inference_steps=4, interval=4)
    x = torch.randn(2, 4, 16, 16)
    labels = torch.tensor([1, 2])
    total = 0
    for t in (900, 600, 300, 100):
        total = total + model(x, timestep=torch.tensor([t, t]), class_labels=labels).sample.square().mean()
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_returned_config_is_a_copy(dit):
    cfg = enable_dual_cache(dit, "fora")
    cfg.interval = 0
    generate(dit, steps=6)  # the engine's own config is untouched
    assert get_engine(dit).config.interval == 3


def test_conflicting_arguments_are_refused(dit):
    plan = fora_plan(6, 3, ("attn1", "ff"))
    with pytest.raises(ValueError, match="either"):
        enable_dual_cache(dit, "fora", plan=plan)
    with pytest.raises(ValueError, match="family"):
        enable_dual_cache(dit, DualCacheConfig.from_preset("duca", "pixart"))
    assert get_engine(dit) is None


def test_re_enabling_logs_the_replacement(dit, caplog):
    enable_dual_cache(dit, "fora")
    with caplog.at_level(logging.INFO, logger="dualcache_diffusers.api"):
        enable_dual_cache(dit, "duca")
    assert "replacing" in caplog.text


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("bare", [False, True], ids=["pipeline", "bare-transformer"])
@pytest.mark.parametrize("block", [0, -1])
@pytest.mark.parametrize("at_step", [1, 4])
def test_a_generation_interrupted_inside_the_transformer_leaves_no_stale_cache(dit, at_step, block, bare):
    """An exception raised mid-generation (Ctrl-C, a server's timeout) must not leak half a generation's
    caches into the next call: the same seed again gives the uninterrupted image. A bare transformer has
    no scheduler to tell generations apart: the interrupted call itself must end its generation."""
    enable_dual_cache(dit.transformer if bare else dit, "duca", num_inference_steps=6 if bare else None)
    expected = generate(dit, steps=6)
    calls = iter(range(100))

    def interrupt(module, args):
        if next(calls) == at_step:
            raise _Interrupted

    handle = dit.transformer.transformer_blocks[block].register_forward_pre_hook(interrupt)
    with pytest.raises(_Interrupted):
        generate(dit, steps=6)
    handle.remove()
    assert np.array_equal(generate(dit, steps=6), expected)


def test_a_generation_interrupted_between_steps_leaves_no_stale_cache(dit):
    enable_dual_cache(dit, "duca")
    expected = generate(dit, steps=6)
    step = dit.scheduler.step

    def failing(*args, **kwargs):
        raise _Interrupted

    dit.scheduler.step = failing  # the transformer's call at step 0 completed, then the loop is cut off
    with pytest.raises(_Interrupted):
        generate(dit, steps=6)
    del dit.scheduler.step
    assert dit.scheduler.step == step
    assert np.array_equal(generate(dit, steps=6), expected)


def test_a_pipeline_sharing_the_transformer_through_from_pipe_is_followed(dit):
    """diffusers' server pattern: per request, ``from_pipe(pipe, scheduler=fresh)`` shares the (cached)
    transformer with a pipeline the engine never saw. Its own step count must drive the plan."""
    enable_dual_cache(dit, "duca")
    expected = {steps: generate(dit, steps=steps) for steps in (6, 9)}
    copy = type(dit).from_pipe(dit, scheduler=type(dit.scheduler).from_config(dit.scheduler.config))
    copy.set_progress_bar_config(disable=True)
    generate(dit, steps=6)  # the enabled pipeline's scheduler last had 6 steps...
    assert np.array_equal(generate(copy, steps=9), expected[9])  # ...the copy's 9 count
    assert np.array_equal(generate(dit, steps=6), expected[6])


def test_disabling_restores_the_scheduler_classes(dit):
    gc.collect()  # engines of earlier tests' pipelines, dropped while enabled, stop watching when collected
    scheduler_class = type(dit.scheduler)
    before = vars(scheduler_class)["set_timesteps"]
    enable_dual_cache(dit)
    assert vars(scheduler_class)["set_timesteps"] is not before
    disable_dual_cache(dit)
    assert vars(scheduler_class)["set_timesteps"] is before
