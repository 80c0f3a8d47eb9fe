"""Work whose result nothing will read is skipped: norms whose output only cached modules read (adapter.input_norms)
where none of them computes, and the forecast of a module whose sole reader computes nothing (sole_readers).

The block's output must not change: the skipped rows only fed modules whose output the step forecasts or reuses
whole. Compared bit for bit against the same plan with every norm running and every forecast computed."""

import numpy as np
import pytest
import torch
from conftest import generate
from family_harness import check_unread_work_is_skipped, run
from test_family_chroma import CASE as CHROMA
from test_family_flux import CASE as FLUX

from dualcache_diffusers import cache_stats, disable_dual_cache, enable_dual_cache
from dualcache_diffusers.adapters import find_adapter
from dualcache_diffusers.adapters.basic_transformer import BasicTransformerAdapter
from dualcache_diffusers.api import get_engine
from dualcache_diffusers.plan import full_plan

# the DuCa preset (aggressive steps forecast every module), a budget whose forecast steps recompute tokens of ff
# but never of attn1, and a budget whose forecast steps recompute nothing
SETTINGS = [dict(config="duca"), dict(budget=2.5), dict(budget=4)]


def _layer_norm_rows(monkeypatch) -> list[int]:
    """Rows normed by every nn.LayerNorm call from now on (the class's forward, wrapped before any hook binds it)."""
    rows: list[int] = []
    original = torch.nn.LayerNorm.forward

    def counting(self, x):
        rows.append(x.numel() // x.shape[-1])
        return original(self, x)

    monkeypatch.setattr(torch.nn.LayerNorm, "forward", counting)
    return rows


@pytest.mark.parametrize("options", SETTINGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_skipping_input_norms_leaves_the_images_bit_for_bit_and_norms_fewer_rows(pipe, options, monkeypatch):
    rows = _layer_norm_rows(monkeypatch)
    enable_dual_cache(pipe, **options)
    skipped = generate(pipe, steps=10)
    pattern = "".join(k[0].upper() for k in cache_stats(pipe).step_kinds)
    normed_skipping = sum(rows)
    disable_dual_cache(pipe)

    monkeypatch.setattr(BasicTransformerAdapter, "input_norms", lambda self, block, spec: {})
    rows.clear()
    enable_dual_cache(pipe, **options)
    every = generate(pipe, steps=10)
    assert "".join(k[0].upper() for k in cache_stats(pipe).step_kinds) == pattern
    normed_every = sum(rows)
    disable_dual_cache(pipe)

    np.testing.assert_array_equal(skipped, every)
    assert pattern.count("F") < len(pattern)
    assert normed_skipping < normed_every, (pattern, normed_skipping, normed_every)


def test_declared_input_norms_resolve_to_layer_norms_of_every_block(pipe):
    adapter = BasicTransformerAdapter()
    for block in pipe.transformer.transformer_blocks:
        norms = adapter.input_norms(block, adapter.block_lists[0])
        assert set(norms) == {"attn1", "ff"}
        for path in norms.values():
            module = block.get_submodule(path)
            assert isinstance(module, torch.nn.LayerNorm), (path, type(module))


def test_a_full_plan_runs_every_norm(dit_pipe, monkeypatch):
    rows = _layer_norm_rows(monkeypatch)
    enable_dual_cache(dit_pipe, interval=1)
    generate(dit_pipe, steps=4)
    cached = sum(rows)
    disable_dual_cache(dit_pipe)
    rows.clear()
    generate(dit_pipe, steps=4)
    assert cached == sum(rows) > 0


# the DuCa preset's aggressive steps skip the block stack and its conservative steps (like those of a budget on these
# 64 tokens) recompute rows of proj_out, so only norms are skipped there; with aggressive steps that forecast every
# module instead, proj_out reuses and its sole readers' forecasts are skipped too
SKIPPING = [(dict(config="duca"), ("layer_norm",)), (dict(budget=4), ("layer_norm",)),
            (dict(config="duca", aggressive="reuse"), ("layer_norm", "gelu"))]


@pytest.mark.parametrize("options, functions", SKIPPING, ids=["duca", "budget=4", "duca-aggressive-reuse"])
@pytest.mark.parametrize("case", [FLUX, CHROMA], ids=lambda case: case.name)
def test_flux_like_blocks_skip_their_norms_and_the_single_blocks_unread_forecasts(case, options, functions,
                                                                                  monkeypatch):
    """Double blocks: the joint attention's two norms and each MLP's norm. Single blocks: the norm shared by
    proj_mlp and attn, and their forecasts (and the MLP's activation) where proj_out, their sole reader, reuses."""
    check_unread_work_is_skipped(case, options, monkeypatch, functions=functions)


def test_a_sole_readers_inputs_return_their_real_outputs_where_one_of_them_computes():
    """A learned plan may compute Flux's single-block proj_mlp while proj_out and attn reuse: attn's output then meets
    proj_mlp's full rows in the concatenation, so it must be its forecast, not one row (the images as with the
    skipping switched off, and no shape error)."""
    def images(skipping: bool) -> np.ndarray:
        pipe = FLUX.build()
        layout = find_adapter(pipe.transformer).layout(pipe.transformer)
        plan = full_plan(6, layout)
        column = layout.modules.index("proj_mlp")
        for step in plan.steps[1:]:  # every module reused but the single blocks' proj_mlp
            step.kind = "learned"
            step.fractions = [[1.0 if m == column and layout.can_partial(b, "proj_mlp") else 0.0
                               for m in range(len(layout.modules))] for b in range(layout.num_blocks)]
        enable_dual_cache(pipe, plan=plan)
        if not skipping:
            get_engine(pipe)._computes_nothing = lambda *_, **__: False
        try:
            return run(pipe, FLUX, steps=6)
        finally:
            disable_dual_cache(pipe)

    np.testing.assert_array_equal(images(True), images(False))
