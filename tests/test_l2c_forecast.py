"""L2C and the dual router with the forecast choice (issue 11, item 3): the router learns against the engine's
order-1 forecast (dual: partial steps recompute their rows into it)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import engine_dit_pipeline

from dualcache_diffusers import CachePlan, disable_dual_cache, enable_dual_cache
from dualcache_diffusers.adapters import find_adapter
from dualcache_diffusers.l2c import train_router
from dualcache_diffusers.l2c.data import generate_trajectories
from dualcache_diffusers.l2c.router import RouterSpec, _plan, export_l2c
from dualcache_diffusers.l2c.trainer import RouterTrainer

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread (conftest)

STEPS, INTERVAL = 9, 3  # full steps 0, 3, 6; cache steps 1, 2, 4, 5, 7, 8


def _spec(pipe, order: int) -> RouterSpec:
    model = pipe.transformer
    return RouterSpec.from_layout("l2c", STEPS, find_adapter(model).layout(model), interval=INTERVAL,
                                  forecast_order=order)


def _hard_plan(spec: RouterSpec) -> tuple[CachePlan, torch.Tensor]:
    """A plan computing about half of the branches at the cache steps (some at the first cache step of a cycle, so
    that the engine's history holds computations at cache steps), and its 0/1 router probabilities."""
    logits = torch.randn(spec.logit_shape, generator=torch.Generator().manual_seed(3)) * 3
    plan = export_l2c(spec, logits, threshold=0.5)
    probs = torch.tensor([plan.steps[s].fractions for s in spec.cache_steps], dtype=torch.float32)
    assert 0 < float(probs.mean()) < 1
    return plan, probs


def _engine_data(pipe, plan: CachePlan, guidance_scale: float | None = None):
    """Trajectories of the pipeline running ``plan`` through the engine: its inputs and outputs at every step."""
    config = enable_dual_cache(pipe, plan=plan)
    assert not config.forecast_reanchor  # the engine's default, the one the trainer reproduces
    try:
        return generate_trajectories(pipe, "dit", STEPS, 2, seed=0, guidance_scale=guidance_scale)
    finally:
        disable_dual_cache(pipe)


def _student_mse(pipe, spec: RouterSpec, data, probs: torch.Tensor, starts: list[int]) -> float:
    """Mean squared difference between the trainer's student (hard probabilities) and the data's outputs."""
    trainer = RouterTrainer(pipe, spec, data, budget=0.5, lr=1e-2, l1=1e-6, batch_size=4, dropout=0.0, seed=0,
                            init="zeros")
    rows = data.cond_rows if data.uncond_rows is None else torch.cat([data.cond_rows, data.uncond_rows])
    starts_t = torch.tensor(starts).repeat_interleave(len(rows))
    rows = rows.repeat(len(starts))
    with torch.no_grad(), trainer.mixer() as mixer:
        total, count, _, _ = trainer._batch_loss(mixer, probs, starts_t, rows)
    return float(total) / count


def test_trainer_forecast_is_what_the_engine_computes():
    """The key check: with a 0/1 router, the trainer's student at every cache step of the first two cycles is what
    the engine outputs there for the exported plan (fed the engine's own inputs), so the router learns against
    what runs. Rows of the first cycle (one computation stored: reuse) and of the second (linear forecast from
    the last two computations, cache steps that computed included) share the batch. Training at order 0
    against a forecasting engine, or at order 1 against a reusing one, is far off."""
    pipe = engine_dit_pipeline()
    spec = _spec(pipe, 1)
    plan, probs = _hard_plan(spec)
    assert [s.forecast_order for s in plan.steps] == [0 if s % INTERVAL == 0 else 1 for s in range(STEPS)]
    data = _engine_data(pipe, plan)
    exact = _student_mse(pipe, spec, data, probs, [0, INTERVAL])
    # order 0 in training, order 1 in the engine: the trainer's reuse is not what runs
    wrong = _student_mse(pipe, _spec(pipe, 0), data, probs, [INTERVAL])
    print(f"order 1 vs engine order 1: {exact:.3g}; order 0 vs engine order 1: {wrong:.3g}")
    assert exact < 1e-6 * wrong, (exact, wrong)
    # and the other way round
    plan0, _ = _hard_plan(_spec(pipe, 0))
    data0 = _engine_data(pipe, plan0)
    exact0 = _student_mse(pipe, _spec(pipe, 0), data0, probs, [0, INTERVAL])
    wrong0 = _student_mse(pipe, spec, data0, probs, [INTERVAL])
    print(f"order 0 vs engine order 0: {exact0:.3g}; order 1 vs engine order 0: {wrong0:.3g}")
    assert exact0 < 1e-6 * wrong0, (exact0, wrong0)


def _dual_spec(pipe, order: int) -> RouterSpec:
    model = pipe.transformer
    return RouterSpec.from_layout("dual", STEPS, find_adapter(model).layout(model), interval=INTERVAL,
                                  forecast_order=order)


def _hard_dual_plan(spec: RouterSpec, seed: int = 5) -> tuple[CachePlan, torch.Tensor]:
    """A plan with every choice (compute, partial, reuse) at the cache steps, and its one-hot router probabilities."""
    choice = torch.randint(0, 3, spec.logit_shape[:-1], generator=torch.Generator().manual_seed(seed))
    choice = torch.where((choice == 1) & ~spec.partial, torch.zeros_like(choice), choice)
    probs = torch.nn.functional.one_hot(choice, 3).float() * spec.present[..., None]
    plan = _plan(spec, torch.tensor([1.0, spec.partial_ratio, 0.0], dtype=torch.float64)[choice], {}, "learned-dual")
    first = [spec.cache_steps.index(s) for s in spec.cache_steps if s < INTERVAL]  # the first cycle
    assert {0, 1, 2} <= set(choice[first].flatten().tolist())  # the first cycle too: one computation stored
    assert {0, 1, 2} <= set(choice.flatten().tolist())
    return plan, probs


def test_dual_trainer_forecast_is_what_the_engine_computes():
    """The key check for the dual router: with one-hot choices (partial steps included), the trainer's student at
    every cache step of the first two cycles is what the engine outputs there for the exported plan: reuse is the
    forecast, a partial step the forecast with its selected rows recomputed; in the first cycle (one computation
    stored) the partial output is what later steps reuse; in the second the history holds the last two
    computations (partial steps are not among them, at the engine's default ``forecast_reanchor=False``).
    Without guidance: the engine shares one token selection between the CFG halves of an image, the trainer
    selects per row."""
    pipe = engine_dit_pipeline()
    spec = _dual_spec(pipe, 1)
    plan, probs = _hard_dual_plan(spec)
    assert [s.forecast_order for s in plan.steps] == [0 if s % INTERVAL == 0 else 1 for s in range(STEPS)]
    assert {f for s in spec.cache_steps for row in plan.steps[s].fractions for f in row} == {0.0, 0.25, 1.0}
    data = _engine_data(pipe, plan, guidance_scale=1.0)
    assert data.uncond_rows is None
    exact = _student_mse(pipe, spec, data, probs, [0, INTERVAL])
    first = _student_mse(pipe, spec, data, probs, [0])  # alone: the first cycle's partial outputs are reused
    wrong = _student_mse(pipe, _dual_spec(pipe, 0), data, probs, [INTERVAL])
    print(f"dual order 1 vs engine order 1: {exact:.3g} (first cycle {first:.3g}); order 0 vs engine: {wrong:.3g}")
    # (exact up to float32 noise of batched matmuls, about 1e-14 here; a wrong branch is about 1e-7)
    assert exact < 1e-5 * wrong and first < 1e-5 * wrong, (exact, first, wrong)
    # and the other way round: order 0 is what a reusing engine computes
    plan0, _ = _hard_dual_plan(_dual_spec(pipe, 0))
    data0 = _engine_data(pipe, plan0, guidance_scale=1.0)
    exact0 = _student_mse(pipe, _dual_spec(pipe, 0), data0, probs, [0, INTERVAL])
    wrong0 = _student_mse(pipe, spec, data0, probs, [INTERVAL])
    print(f"dual order 0 vs engine order 0: {exact0:.3g}; order 1 vs engine order 0: {wrong0:.3g}")
    assert exact0 < 1e-5 * wrong0, (exact0, wrong0)


@pytest.mark.parametrize("kind", ["l2c", "dual"])
@pytest.mark.parametrize("case", ["flux", "sd3", "latte"])
def test_trainer_forecast_is_what_the_engine_computes_on_blocks_that_differ(case, kind):
    """The same on Flux (tuple outputs of joint attention; for the dual router, single blocks recomputing one group
    of rows), SD3.5 (modules present in some blocks only) and Latte (frames or positions folded into the batch of
    its blocks); the dual router without guidance (see above)."""
    from test_l2c_layouts import BUILDERS, CALLS

    pipe = BUILDERS[case]()
    model = pipe.transformer
    adapter = find_adapter(model)
    spec = RouterSpec.from_layout(kind, STEPS, adapter.layout(model), interval=INTERVAL, forecast_order=1)
    plan, probs = _hard_plan(spec) if kind == "l2c" else _hard_dual_plan(spec)
    call = CALLS[case] if kind == "l2c" else {**CALLS[case], "guidance_scale": 1.0}
    enable_dual_cache(pipe, plan=plan)
    try:
        data = generate_trajectories(pipe, adapter.family(model), STEPS, 2, seed=0, pipeline_kwargs=call,
                                     shared=adapter.shared_inputs)
    finally:
        disable_dual_cache(pipe)
    assert kind == "l2c" or data.uncond_rows is None
    exact = _student_mse(pipe, spec, data, probs, [0, INTERVAL])
    wrong = _student_mse(pipe, dataclasses.replace(spec, forecast_order=0), data, probs, [INTERVAL])
    assert exact < (1e-6 if kind == "l2c" else 1e-5) * wrong, (exact, wrong)


def test_soft_forecast_is_the_expectation_over_choices():
    """With a probability strictly between 0 and 1 the reused branch is the expectation of the engine's forecast
    over the earlier choice: attn1 of the only block computed at the first cache step of a cycle with probability
    p (history (f, f+1)) or not (history (f-3, f)), reused at the next step: p * one + (1 - p) * the other."""
    pipe = engine_dit_pipeline(num_layers=1)
    spec = _spec(pipe, 1)
    data = generate_trajectories(pipe, "dit", STEPS, 1, seed=0)
    trainer = RouterTrainer(pipe, spec, data, budget=None, lr=1e-2, l1=1e-6, batch_size=2, dropout=0.0, seed=0,
                            init="zeros")
    attn = find_adapter(pipe.transformer).block_infos(pipe.transformer)[0].block.attn1

    def reused(p: float) -> torch.Tensor:
        probs = torch.zeros(spec.logit_shape)
        probs[spec.cache_steps.index(INTERVAL + 1), 0, 0] = p
        seen = []
        with torch.no_grad(), trainer.mixer() as mixer:
            handle = attn.register_forward_hook(lambda m, i, o: seen.append(o.clone()))  # after the mixer's hook
            try:
                trainer._batch_loss(mixer, probs, torch.tensor([INTERVAL]), data.cond_rows)
            finally:
                handle.remove()
        return seen[-1]  # step f + 2

    one, zero, soft = reused(1.0), reused(0.0), reused(0.3)
    assert not torch.allclose(one, zero, atol=1e-4)
    torch.testing.assert_close(soft, 0.3 * one + 0.7 * zero, atol=1e-6, rtol=1e-5)


def test_dual_soft_partial_output_is_the_expectation_over_choices():
    """While one computation is stored (the first cycle) a partial step writes its output over what plain reuse
    returns: attn1 of the only block, partial with probability p at the first cache step (else reused), is reused
    at the next step as p * the partial output + (1 - p) * the full step's."""
    pipe = engine_dit_pipeline(num_layers=1)
    spec = _dual_spec(pipe, 1)
    data = generate_trajectories(pipe, "dit", STEPS, 1, seed=0, guidance_scale=1.0)
    trainer = RouterTrainer(pipe, spec, data, budget=0.5, lr=1e-2, l1=None, batch_size=2, dropout=0.0, seed=0,
                            init="zeros")
    attn = find_adapter(pipe.transformer).block_infos(pipe.transformer)[0].block.attn1

    def reused(p: float) -> torch.Tensor:
        probs = torch.zeros(spec.logit_shape)
        probs[..., 2] = 1.0  # reuse everything ...
        probs[spec.cache_steps.index(1), 0, 0] = torch.tensor([0.0, p, 1 - p])  # ... but attn1 at step 1
        seen = []
        with torch.no_grad(), trainer.mixer() as mixer:
            handle = attn.register_forward_hook(lambda m, i, o: seen.append(o.clone()))  # after the mixer's hook
            try:
                trainer._batch_loss(mixer, probs, torch.tensor([0]), data.cond_rows)
            finally:
                handle.remove()
        return seen[-1]  # step 2

    one, zero, soft = reused(1.0), reused(0.0), reused(0.3)
    assert not torch.allclose(one, zero, atol=1e-4)
    torch.testing.assert_close(soft, 0.3 * one + 0.7 * zero, atol=1e-6, rtol=1e-5)


def test_dual_forecast_trains_exports_resumes_and_runs(tmp_path):
    from diffusers import DDIMScheduler

    pipe = engine_dit_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # (DPMSolver's config holds -inf: no JSON)
    common = dict(num_inference_steps=STEPS, budget=0.6, kind="dual", interval=INTERVAL, forecast_order=1,
                  num_images=3, batch_size=4, seed=7, return_router=True)
    plan_a, router_a = train_router(pipe, iterations=6, **common)
    assert [s.forecast_order for s in plan_a.steps] == [0 if s % INTERVAL == 0 else 1 for s in range(STEPS)]
    assert plan_a.metadata["learned"]["forecast_order"] == 1
    assert plan_a.metadata["learned"]["router"] == "dual"
    train_router(pipe, iterations=3, checkpoint=tmp_path / "ckpt", **common)
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["spec"]["forecast_order"] == 1
    plan_b, router_b = train_router(pipe, iterations=6, resume=tmp_path / "ckpt", **common)
    assert torch.equal(router_a.logits, router_b.logits) and router_a.losses == router_b.losses
    assert plan_a.to_dict() == plan_b.to_dict()
    assert router_a.logits.abs().sum() > 0  # it trained
    with pytest.raises(ValueError, match="forecast_order"):  # a checkpoint of another order
        train_router(pipe, iterations=7, resume=tmp_path / "ckpt", **{**common, "forecast_order": 0})
    loaded = CachePlan.from_json(plan_a.to_json(tmp_path / "p.json"))
    assert loaded.to_dict() == plan_a.to_dict()
    enable_dual_cache(pipe, plan=loaded)  # the plan runs
    out = pipe(class_labels=[1], num_inference_steps=STEPS, output_type="np").images
    disable_dual_cache(pipe)
    assert np.isfinite(out).all()
    # the dual router forecasts by default too (measured better, docs/plans.md); order 0 on request
    for order, orders in ((None, [0, 1, 1, 0, 1, 1]), (0, [0] * 6)):
        plan = train_router(pipe, num_inference_steps=6, budget=0.6, kind="dual", interval=3, iterations=1,
                            num_images=2, batch_size=2, forecast_order=order)
        assert [s.forecast_order for s in plan.steps] == orders


@pytest.mark.parametrize("flag, orders", [([], [0, 1, 1, 0, 1, 1]), (["--forecast-order", "0"], [0] * 6)])
def test_cli_forecasts_by_default_for_l2c(dit_dir, tmp_path, capsys, flag, orders):
    from dualcache_diffusers import cli

    out = tmp_path / "plan.json"
    args = ["train-router", "--model", str(dit_dir), "--steps", "6", "--budget", "0.6", "--interval", "3",
            "--iterations", "2", "--num-images", "2", "--batch-size", "2", "--device", "cpu", "--out", str(out), *flag]
    assert cli.main(args) == 0
    plan = CachePlan.from_json(out)
    assert [s.forecast_order for s in plan.steps] == orders
    assert plan.metadata["learned"]["forecast_order"] == orders[1]


def test_cli_trains_the_dual_router_with_forecasting(dit_dir, tmp_path, capsys):
    from dualcache_diffusers import cli

    out = tmp_path / "plan.json"
    args = ["train-router", "--model", str(dit_dir), "--steps", "6", "--budget", "0.6", "--interval", "3",
            "--kind", "dual", "--forecast-order", "1", "--iterations", "2", "--num-images", "2", "--batch-size",
            "2", "--device", "cpu", "--out", str(out)]
    assert cli.main(args) == 0
    plan = CachePlan.from_json(out)
    assert [s.forecast_order for s in plan.steps] == [0, 1, 1, 0, 1, 1]
    assert plan.metadata["learned"]["forecast_order"] == 1 and plan.metadata["learned"]["router"] == "dual"
    assert CachePlan.from_json(plan.to_json(tmp_path / "again.json")).to_dict() == plan.to_dict()


def test_train_router_forecast_order_exports_and_validates(tmp_path):
    from diffusers import DDIMScheduler

    pipe = engine_dit_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # (DPMSolver's config holds -inf: no JSON)
    plan = train_router(pipe, num_inference_steps=6, budget=0.6, interval=3, iterations=3, num_images=2,
                        batch_size=4, forecast_order=1, checkpoint=tmp_path / "ckpt")
    assert [s.forecast_order for s in plan.steps] == [0, 1, 1, 0, 1, 1]
    assert plan.metadata["learned"]["forecast_order"] == 1
    assert CachePlan.from_json(plan.to_json(tmp_path / "p.json")).steps[1].forecast_order == 1
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    assert state["spec"]["forecast_order"] == 1
    # the checkpoint was trained with another forecast order: refused on resume
    with pytest.raises(ValueError, match="forecast_order"):
        train_router(pipe, num_inference_steps=6, budget=0.6, interval=3, iterations=4, num_images=2,
                     batch_size=4, forecast_order=0, resume=tmp_path / "ckpt")
    enable_dual_cache(pipe, plan=plan)  # the plan runs
    pipe(class_labels=[1], num_inference_steps=6, output_type="np")
    disable_dual_cache(pipe)
    for bad in (2, -1, True, 0.5):
        with pytest.raises(ValueError, match="forecast_order"):
            train_router(pipe, num_inference_steps=6, forecast_order=bad)
    for bad in (2, True):
        with pytest.raises(ValueError, match="forecast_order"):
            train_router(pipe, num_inference_steps=6, kind="dual", forecast_order=bad)
    # order 0 keeps the spec (and so old checkpoints) as before
    assert "forecast_order" not in _spec(pipe, 0).to_dict()


def test_resume_with_forecasting_gives_the_same_result_as_an_uninterrupted_run(tmp_path):
    pipe = engine_dit_pipeline()
    common = dict(num_inference_steps=STEPS, budget=0.6, kind="l2c", interval=INTERVAL, forecast_order=1,
                  num_images=3, batch_size=4, seed=7, return_router=True)
    plan_a, router_a = train_router(pipe, iterations=6, **common)
    train_router(pipe, iterations=3, checkpoint=tmp_path / "ckpt", **common)
    plan_b, router_b = train_router(pipe, iterations=6, resume=tmp_path / "ckpt", **common)
    assert torch.equal(router_a.logits, router_b.logits) and router_a.losses == router_b.losses
    assert plan_a.to_dict() == plan_b.to_dict()
    assert router_a.logits.abs().sum() > 0  # it trained
