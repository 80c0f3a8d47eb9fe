"""The checks every supported family passes (issue 10), run on a tiny pipeline built from configs.

A family's test file builds its tiny pipeline and a :class:`FamilyCase`, then calls
:func:`check_family` (or the single checks). Nothing is downloaded.

    CASE = FamilyCase("latte", build=tiny_latte_pipeline, call_kwargs={...})
    def test_latte(): check_family(CASE)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dualcache_diffusers import cache_stats, count_flops, disable_dual_cache, enable_dual_cache
from dualcache_diffusers.api import get_engine

STEPS = 20


@dataclass
class FamilyCase:
    name: str
    build: Callable[[], Any]  # a tiny pipeline (progress bar off)
    call_kwargs: dict[str, Any]  # everything but generator / num_inference_steps / output_type
    two_call_cfg: bool = False  # the pipeline calls the denoiser once per CFG branch
    presets: tuple[str, ...] = ("duca", "toca", "fora")
    min_speedup: float = 2.0
    output_type: str = "np"
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # preset -> extra enable arguments
    atol: float = 1e-5  # interval=1 vs stock


def run(pipe: Any, case: FamilyCase, steps: int = STEPS, seed: int = 0) -> np.ndarray:
    out = pipe(
        **case.call_kwargs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
        output_type=case.output_type,
    )
    frames = getattr(out, "frames", None)
    images = frames if frames is not None else out.images
    if isinstance(images, torch.Tensor):
        images = images.float().cpu().numpy()
    return np.asarray(images, dtype=np.float32)


def check_interval_one_is_stock(pipe: Any, case: FamilyCase, stock: np.ndarray) -> None:
    enable_dual_cache(pipe, "duca", interval=1)
    try:
        cached = run(pipe, case)
    finally:
        disable_dual_cache(pipe)
    np.testing.assert_allclose(cached, stock, atol=case.atol, rtol=0)


def check_disable_is_bit_identical(pipe: Any, case: FamilyCase, stock: np.ndarray) -> None:
    enable_dual_cache(pipe)
    run(pipe, case, steps=6)
    disable_dual_cache(pipe)
    assert np.array_equal(run(pipe, case), stock)
    for module in pipe.transformer.modules():  # (diffusers' cache_context itself leaves empty registries)
        registry = getattr(module, "_diffusers_hook", None)
        assert registry is None or not any(name.startswith("dualcache") for name in registry.hooks)


def check_preset_cuts_flops(pipe: Any, case: FamilyCase, preset: str, uncached_flops: int) -> None:
    enable_dual_cache(pipe, preset, **case.overrides.get(preset, {}))
    try:
        with count_flops() as counter:
            first = run(pipe, case)
        stats = cache_stats(pipe)
        second = run(pipe, case)
    finally:
        disable_dual_cache(pipe)
    measured = counter.get_total_flops()
    assert uncached_flops / measured >= case.min_speedup, (preset, uncached_flops / measured, stats.step_kinds)
    # the engine's own count of the denoiser, plus what runs outside it, matches the counter
    engine_total = uncached_flops - stats.flops_uncached + stats.flops
    assert abs(engine_total / measured - 1) < 0.001, (preset, engine_total / measured - 1)
    assert np.array_equal(first, second), f"{preset}: the same seed twice gave different outputs"
    assert np.isfinite(first).all()


def check_two_call_branches_are_separate(pipe: Any, case: FamilyCase) -> None:
    """Pipelines that call the denoiser per CFG branch: each branch keeps its own caches."""
    enable_dual_cache(pipe, "fora")
    try:
        run(pipe, case, steps=6)
        engine = get_engine(pipe)
        branches = {key.split("/")[0] for key in engine.last_stats}
        assert len(branches) >= 2, f"cond and uncond share one cache state: {sorted(engine.last_stats)}"
        assert all(s.num_calls == 6 for s in engine.last_stats.values())
    finally:
        disable_dual_cache(pipe)


def check_family(case: FamilyCase) -> None:
    pipe = case.build()
    stock = run(pipe, case)
    assert np.isfinite(stock).all()
    check_interval_one_is_stock(pipe, case, stock)
    check_disable_is_bit_identical(pipe, case, stock)
    with count_flops() as counter:
        run(pipe, case)
    uncached = counter.get_total_flops()
    for preset in case.presets:
        check_preset_cuts_flops(pipe, case, preset, uncached)
    if case.two_call_cfg:
        check_two_call_branches_are_separate(pipe, case)


def check_partial_self_attention(pipe: Any, case: FamilyCase, steps: int = 6, fresh_ratio: float = 0.5,
                                 blocks: str | None = None) -> None:
    """RoPE self- or joint attention at partial steps: the recomputed rows equal the same rows of the full
    attention (selected queries, all keys and values, the rotary table sliced to the selected rows), the
    other rows keep the cached output, a joint module's text output is the full one, and a module's whole
    computation still matches stock."""
    enable_dual_cache(pipe, "toca", fresh_ratio=fresh_ratio, ratio_schedule="constant", self_attention="partial",
                      **case.overrides.get("partial", {}))
    try:
        den = get_engine(pipe).denoisers[0]
        assert any(name in den.layout.partial for name, spec in den.adapter.module_specs(den.model).items()
                   if spec.rotary is not None), den.layout.partial
        attn, cached = next((m, c) for m, c in den.modules if c.spec.rotary is not None
                            and blocks in (None, den.infos[c.block].spec.attr))  # the first one (of ``blocks``)
        calls: list[tuple[torch.Tensor, torch.Tensor]] = []  # (full attention of this call's input, hook output)

        def record(module, args, kwargs, output):
            # computed by the partial path, not the whole-module fallback for processors it does not reproduce
            assert cached.spec.rotary.supports(module, args, kwargs), type(module.processor).__name__
            with torch.no_grad():  # the stock forward of the class, past the cache hook
                full = type(module).forward(module, *args, **kwargs)
            if isinstance(output, tuple):  # joint attention (image, text): every text row is recomputed
                torch.testing.assert_close(output[1], full[1], atol=1e-5, rtol=1e-4)
                full, output = full[0], output[0]
            calls.append((full, output.detach().clone()))

        handle = attn.register_forward_hook(record, with_kwargs=True)
        try:
            run(pipe, case, steps=steps)
        finally:
            handle.remove()
        stats = cache_stats(pipe)
    finally:
        disable_dual_cache(pipe)
    assert 0 < stats.tokens_computed[cached.name] < stats.tokens_total[cached.name], stats.tokens_computed
    partial_calls = 0
    previous: dict[tuple[int, int], torch.Tensor] = {}  # per CFG branch: (batch size, call of the step)
    for i, (full, out) in enumerate(calls):
        batch = (out.shape[0], i % 2 if case.two_call_cfg else 0)
        fresh = torch.isclose(out, full, atol=1e-5, rtol=1e-4).all(-1)  # (batch, rows)
        if bool(fresh.all()):
            previous[batch] = out
            continue
        partial_calls += 1
        kept = (out == previous[batch]).all(-1)  # toca does not forecast: the other rows are the cached ones
        assert bool((fresh | kept).all()), "a row is neither recomputed correctly nor the cached one"
        assert int(fresh.sum(1).min()) >= int(fresh_ratio * out.shape[1]), fresh.sum(1)
        previous[batch] = out
    assert partial_calls > 0


def check_partial_preset_flops(case: FamilyCase, preset: str = "duca") -> None:
    """``preset`` with ``self_attention="partial"``: FLOPs cut by ``case.min_speedup`` and the engine's count
    (selected rows' share of each partial attention) within 5% of the counter's."""
    pipe = case.build()
    with count_flops() as counter:
        run(pipe, case)
    overrides = {preset: {**case.overrides.get(preset, {}), "self_attention": "partial"}}
    check_preset_cuts_flops(pipe, dataclasses.replace(case, overrides=overrides), preset, counter.get_total_flops())


def count_elements(monkeypatch: Any, functions: tuple[str, ...]) -> dict[str, int]:
    """Elements passed from now on to each of ``functions`` (of ``torch.nn.functional``), by name."""
    from torch.nn import functional

    seen = dict.fromkeys(functions, 0)
    for name in functions:
        original = getattr(functional, name)

        def counting(x, *args, _name=name, _original=original, **kwargs):
            seen[_name] += x.numel()
            return _original(x, *args, **kwargs)

        monkeypatch.setattr(functional, name, counting)
    return seen


def switch_off_unread_skipping(monkeypatch: Any) -> None:
    """From now on every engine runs every declared norm and computes every forecast (no ``input_norms`` /
    ``sole_readers`` skipping): the reference the skipping must equal bit for bit."""
    from dualcache_diffusers.engine import DualCacheEngine

    monkeypatch.setattr(DualCacheEngine, "_computes_nothing", staticmethod(lambda *_, **__: False))


def check_unread_work_is_skipped(case: FamilyCase, options: dict[str, Any], monkeypatch: Any, steps: int = 10,
                                 functions: tuple[str, ...] = ("layer_norm",)) -> None:
    """The adapter's ``input_norms`` / ``sole_readers``: the images equal, bit for bit, those of the same plan with
    both switched off (every norm runs, every forecast is computed), and each of ``functions`` (of
    ``torch.nn.functional``) sees fewer elements."""
    seen = count_elements(monkeypatch, functions)

    def generate() -> tuple[np.ndarray, str, dict[str, int]]:
        pipe = case.build()
        seen.update(dict.fromkeys(functions, 0))
        enable_dual_cache(pipe, **options)
        try:
            images = run(pipe, case, steps)
            pattern = "".join(kind[0].upper() for kind in cache_stats(pipe).step_kinds)
        finally:
            disable_dual_cache(pipe)
        return images, pattern, dict(seen)

    skipping, pattern, fewer = generate()
    switch_off_unread_skipping(monkeypatch)
    every, same_pattern, more = generate()
    assert same_pattern == pattern and pattern.count("F") < len(pattern), (pattern, same_pattern)
    np.testing.assert_array_equal(skipping, every)
    for name in functions:
        assert fewer[name] < more[name], (name, pattern, fewer[name], more[name])


def check_unread_rms_norms_are_skipped(case: FamilyCase, options: dict[str, Any], monkeypatch: Any) -> None:
    """``check_unread_work_is_skipped`` for blocks whose declared norms run diffusers' ``RMSNorm``, which computes by
    hand (no ``torch.nn.functional`` call to count): the rows it normed in each of the check's two generations (each
    builds its pipeline first), fewer with the skipping on."""
    from diffusers.models.normalization import RMSNorm

    rows: list[int] = []
    original = RMSNorm.forward

    def counting(self, x):
        rows[-1] += x.numel() // x.shape[-1]
        return original(self, x)

    def build():
        rows.append(0)
        return case.build()

    monkeypatch.setattr(RMSNorm, "forward", counting)  # before the hooks bind the forward
    check_unread_work_is_skipped(dataclasses.replace(case, build=build), options, monkeypatch, functions=())
    assert len(rows) == 2 and rows[0] < rows[1], rows
