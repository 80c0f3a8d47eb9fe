"""Published rules available as published (issue 11, item 4): ToCa's DiT DDIM schedule, separate CFG halves."""

from __future__ import annotations

import pytest
import torch
from conftest import engine_dit_pipeline, generate

from dualcache_diffusers import enable_dual_cache
from dualcache_diffusers.api import get_engine
from dualcache_diffusers.config import DualCacheConfig
from dualcache_diffusers.plan import PlanLayout, dit_duca_step_kinds, dit_toca_step_kinds


def test_toca_dit_preset_follows_the_authors_ddim_interval_rule():
    cfg = DualCacheConfig.from_preset("toca", "dit")
    plan = cfg.build_plan(20, PlanLayout.uniform_layout(4, ("attn1", "ff")))
    kinds = plan.kinds()
    # N = round(4 / (1.4 - 0.8 s / 20)) at each full step, forced to 2 for s in [4, 8), s counting down
    assert "".join(k[0].upper() for k in kinds) == "FFCCCCCFCCCFCCCFCFCF"
    assert kinds.count("full") == 7 and set(kinds) == {"full", "conservative"}
    assert kinds == dit_toca_step_kinds(20, 4)
    # the same full steps as the DuCa rule at the same threshold; ToCa has no aggressive steps
    duca = dit_duca_step_kinds(20, 4)
    assert [k == "full" for k in kinds] == [k == "full" for k in duca]
    assert dit_toca_step_kinds(50, 4).count("full") == 17


def test_the_fixed_cycle_toca_is_still_available():
    cfg = DualCacheConfig.from_preset("toca", "dit", schedule="cycle", interval=4)
    kinds = cfg.build_plan(8, PlanLayout.uniform_layout(2, ("attn1", "ff"))).kinds()
    assert kinds == ["full", "conservative", "conservative", "conservative"] * 2


@pytest.mark.parametrize("mode, shared", [("shared", True), ("separate", False)])
def test_cfg_halves_are_scored_together_or_separately(mode, shared):
    pipe = engine_dit_pipeline(num_layers=2)
    enable_dual_cache(pipe, "toca", selection="random", cfg_selection=mode, schedule="cycle")
    engine = get_engine(pipe)
    picked = []
    original = engine._select

    def spy(*args, **kwargs):
        index = original(*args, **kwargs)
        picked.append(index)
        return index

    engine._select = spy
    generate(pipe, steps=8, batch=1, guidance_scale=4.0)
    assert picked
    assert all(torch.equal(index[0], index[1]) == shared for index in picked)


def test_cfg_selection_is_validated():
    with pytest.raises(ValueError, match="cfg_selection='both'"):
        DualCacheConfig(cfg_selection="both")
