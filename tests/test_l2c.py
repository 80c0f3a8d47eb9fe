"""Learning-to-Cache and the learned dual schedule: router, training, export, published files, plots."""

from __future__ import annotations

import argparse
import os
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch
from conftest import PIXART_KWARGS, engine_dit_pipeline, engine_pixart_pipeline, generate

from dualcache_diffusers import CachePlan, DualCacheConfig, StepPlan, count_flops, enable_dual_cache
from dualcache_diffusers.l2c import load_published_router, plot_plan, train_router
from dualcache_diffusers.l2c.data import generate_trajectories
from dualcache_diffusers.l2c.mixing import Mixer
from dualcache_diffusers.l2c.router import RouterSpec, probabilities
from dualcache_diffusers.l2c.trainer import RouterTrainer
from dualcache_diffusers.plan import PlanLayout, fora_plan

STEPS = 6


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread (conftest)


def _small(pipe):
    return {} if "DiT" in type(pipe).__name__ else {"pipeline_kwargs": PIXART_KWARGS}


def _trainer(pipe, kind: str, budget: float = 0.6, l1: float | None = None, seed: int = 0) -> RouterTrainer:
    from dualcache_diffusers.adapters import find_adapter

    adapter = find_adapter(pipe.transformer)
    family = adapter.family(pipe.transformer)
    interval = 2 if kind == "l2c" else 3
    spec = RouterSpec(kind, STEPS, len(adapter.blocks(pipe.transformer)), adapter.module_names(pipe.transformer),
                      interval=interval)
    data = generate_trajectories(pipe, family, STEPS, 4, seed, pipeline_kwargs=_small(pipe).get("pipeline_kwargs"))
    return RouterTrainer(pipe, spec, data, budget=budget, lr=5e-2, l1=l1, batch_size=4, dropout=0.1, seed=seed,
                         init="zeros")


def _objective(trainer: RouterTrainer, batches: int = 6) -> float:
    """Data MSE of the current router on a fixed set of batches (its own generator, so deterministic)."""
    saved = trainer.generator.get_state()
    trainer.generator.manual_seed(1234)
    total = count = 0.0
    with torch.no_grad(), Mixer(trainer.model, trainer.adapter) as mixer:
        for _ in range(batches):
            starts, rows = trainer._draw()
            t, c, _, _ = trainer._batch_loss(mixer, probabilities(trainer.spec, trainer.logits), starts, rows)
            total, count = total + float(t), count + c
    trainer.generator.set_state(saved)
    return total / count


@pytest.mark.parametrize("kind", ["l2c", "dual"])
def test_router_gradient_reaches_the_logits(pipe, kind):
    trainer = _trainer(pipe, kind, l1=1e-6)
    pipe.transformer.requires_grad_(False)
    with Mixer(trainer.model, trainer.adapter) as mixer:
        starts, rows = trainer._draw()
        probs = probabilities(trainer.spec, trainer.logits)
        total, count, used, _ = trainer._batch_loss(mixer, probs, starts, rows)
        (total / count).backward()
    grad = trainer.logits.grad
    assert grad is not None and torch.isfinite(grad).all()
    for c in range(len(trainer.spec.cache_steps)):  # every cache step drawn in the batch gets a gradient
        assert (grad[c].abs().sum() > 0) == bool(used[c] > 0)
    assert used.sum() > 0
    # training leaves the model's weights untouched and restores their requires_grad flags
    pipe.transformer.requires_grad_(True)
    weights = [p.detach().clone() for p in pipe.transformer.parameters()]
    trainer.train(2)
    for p, w in zip(pipe.transformer.parameters(), weights):
        assert p.grad is None and p.requires_grad and torch.equal(p, w)


@pytest.mark.parametrize("kind", ["l2c", "dual"])
def test_training_lowers_the_loss(dit_pipe, kind):
    trainer = _trainer(dit_pipe, kind, budget=0.9, l1=1e-9)
    before = _objective(trainer)
    trainer.train(40)
    after = _objective(trainer)
    assert after < 0.7 * before, (before, after)
    assert float(trainer.logits.abs().max()) <= 5.0  # clamped


@pytest.mark.parametrize(
    ("family", "kind", "budget"), [("dit", "l2c", 0.6), ("dit", "dual", 0.45), ("pixart", "dual", 0.5)]
)
def test_budget_export_hits_the_flops_fraction_measured_by_count_flops(family, kind, budget):
    pipe = engine_dit_pipeline() if family == "dit" else engine_pixart_pipeline()
    plan = train_router(pipe, num_inference_steps=10, budget=budget, kind=kind, iterations=15, num_images=4,
                        batch_size=4, **_small(pipe))

    def transformer_flops(counter) -> int:
        return sum(counter.get_flop_counts()[type(pipe.transformer).__name__].values())

    with count_flops() as counter:
        generate(pipe, steps=10)
    uncached = transformer_flops(counter)
    enable_dual_cache(pipe, plan=plan)
    with count_flops() as counter:
        out = generate(pipe, steps=10)
    measured = transformer_flops(counter) / uncached
    assert np.isfinite(out).all()
    assert measured == pytest.approx(budget, rel=0.05)
    assert plan.metadata["flops_fraction"] == pytest.approx(measured, rel=0.05)
    assert plan.metadata["num_inference_steps"] == 10
    assert plan.metadata["scheduler"]["class"] == type(pipe.scheduler).__name__
    if kind == "dual":
        fractions = {f for step in plan.steps for row in step.fractions for f in row}
        assert fractions <= {0.0, 0.25, 1.0}


def test_l2c_threshold_export_as_published(dit_pipe):
    plan, router = train_router(dit_pipe, num_inference_steps=STEPS, budget=None, iterations=3, num_images=2,
                                batch_size=2, return_router=True)
    s = torch.sigmoid(router.logits)
    for c, step in enumerate(router.spec.cache_steps):
        expected = (s[c] > 0.1).double().tolist()
        assert plan.steps[step].fractions == expected
    assert [st.kind for st in plan.steps] == ["full", "learned"] * (STEPS // 2)
    assert plan.metadata["threshold"] == 0.1


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path, dit_pipe):
    common = dict(num_inference_steps=STEPS, budget=0.45, kind="dual", num_images=3, batch_size=3, seed=7,
                  return_router=True)
    plan_a, router_a = train_router(dit_pipe, iterations=8, **common)
    train_router(dit_pipe, iterations=4, checkpoint=tmp_path / "ckpt", **common)
    files = ["data.json", "data.safetensors", "router.safetensors", "state.json"]
    assert sorted(os.listdir(tmp_path / "ckpt")) == files
    plan_b, router_b = train_router(dit_pipe, iterations=8, resume=tmp_path / "ckpt", **common)
    assert torch.equal(router_a.logits, router_b.logits)
    assert router_a.losses == router_b.losses
    assert plan_a.to_dict() == plan_b.to_dict()
    _, router_c = train_router(dit_pipe, iterations=8, **{**common, "seed": 8})
    assert not torch.equal(router_a.logits, router_c.logits)


def _write_router_file(path, routers: dict[int, list[float]]) -> None:
    state = OrderedDict((f"{k}.prob", torch.tensor(v)) for k, v in routers.items())
    torch.save({"routers": state, "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(num_sampling_steps=len(routers), l1=5e-6)}, path)


def test_published_router_format_maps_to_the_expected_plan(tmp_path):
    # depth 2 -> 4 logits per step: [attn block0, mlp block0, attn block1, mlp block1]; 6 DDIM steps
    hi, lo = 3.0, -4.0  # sigmoid 0.95 / 0.018 against threshold 0.1
    routers = {k: [hi, hi, hi, hi] for k in range(6)}
    routers[4] = [lo, hi, lo, lo]  # k=4 -> diffusers call 1: only block 0's MLP computed
    routers[2] = [hi, lo, lo, hi]  # k=2 -> call 3
    routers[0] = [lo, lo, lo, lo]  # k=0 -> call 5 (the last, least noisy step)
    routers[5] = [lo, lo, lo, lo]  # odd k: full steps, their routers are unused
    path = tmp_path / "DDIM6_router.pt"
    _write_router_file(path, routers)
    plan = load_published_router(path, num_inference_steps=6, depth=2)
    assert plan.kinds() == ["full", "learned", "full", "learned", "full", "learned"]
    assert plan.steps[0].is_full and plan.steps[2].is_full and plan.steps[4].is_full
    assert plan.steps[1].fractions == [[0.0, 1.0], [0.0, 0.0]]
    assert plan.steps[3].fractions == [[1.0, 0.0], [0.0, 1.0]]
    assert plan.steps[5].fractions == [[0.0, 0.0], [0.0, 0.0]]
    assert plan.modules == ("attn1", "ff")
    # odd step counts: the first call (even k, nothing cached yet) is full
    _write_router_file(tmp_path / "r5.pt", {k: [lo] * 4 for k in range(5)})
    assert load_published_router(tmp_path / "r5.pt").kinds() == ["full", "full", "learned", "full", "learned"]
    with pytest.raises(ValueError, match="num_inference_steps=20"):
        load_published_router(path, num_inference_steps=20)
    with pytest.raises(ValueError, match="depth=28"):
        load_published_router(path, depth=28)
    # it runs on a DiT pipeline of that depth
    pipe = engine_dit_pipeline(num_layers=2)
    enable_dual_cache(pipe, plan=plan)
    assert np.isfinite(generate(pipe, steps=6)).all()


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch", "pickle"])
def test_malicious_router_file_is_refused_and_does_not_run(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil_router.pt"
    payload = {"routers": OrderedDict([("0.prob", torch.zeros(4))]), "args": _Payload(str(marker))}
    if how == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(ValueError, match="refusing to load"):
        load_published_router(path)
    assert not marker.exists()


def test_resample_maps_by_nearest_normalized_time_and_keeps_the_first_step_full():
    plan = fora_plan(10, 2, ("attn1", "ff"), interval=3)  # FAAFAAFAAF
    letters = lambda p: "".join("F" if s.is_full else "A" for s in p.steps)  # noqa: E731
    assert letters(plan) == "FAAFAAFAAF"
    assert letters(plan.resample(20)) == "FFAAAAFFAAAAFFAAAAFF"  # every step doubled
    assert letters(plan.resample(10)) == letters(plan)
    # 10 -> 5: new step j copies old step floor((j + 0.5) * 2) = 1, 3, 5, 7, 9; step 0 forced full
    assert letters(plan.resample(5)) == "FFAAF"
    assert plan.resample(5).metadata["resampled"] == {"from_steps": 10, "to_steps": 5,
                                                      "rule": "nearest-normalized-time"}
    with pytest.raises(ValueError, match="num_steps"):
        plan.resample(0)
    # using a plan at another step count is an explained error that points to resample()
    cfg = DualCacheConfig(plan=plan)
    with pytest.raises(ValueError, match=r"plan\.resample\(12\)"):
        cfg.build_plan(12, PlanLayout.uniform_layout(2, ("attn1", "ff")))


def test_plot_plan_writes_a_heatmap_png(tmp_path):
    steps = [StepPlan("full", [[1.0, 1.0, 1.0]] * 3), StepPlan("learned", [[0.0, 0.25, 1.0]] * 3),
             StepPlan("aggressive", [[0.0, 0.0, 0.0]] * 3, skip_blocks=True)]
    plan = CachePlan(3, 3, ("attn1", "attn2", "ff"), steps)
    path = plot_plan(plan, tmp_path / "plan.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.shape[1] > image.shape[0] > 50  # three panels side by side


def test_cli_commands_register_and_plan_command_runs(tmp_path, capsys):
    from dualcache_diffusers.l2c.cli import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train-router", "--model", "x", "--steps", "10", "--budget", "0.4", "--out", "p.json",
                              "--kind", "dual", "--iterations", "5", "--seed", "3"])
    assert (args.kind, args.steps, args.budget, args.iterations, args.seed) == ("dual", 10, 0.4, 5, 3)
    plan_path = tmp_path / "p.json"
    fora_plan(6, 2, ("attn1", "ff")).to_json(plan_path)
    args = parser.parse_args(["plan", str(plan_path), "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "step pattern" in printed and "legend: step pattern: one letter per denoising step: F = full" in printed
    assert (tmp_path / "out" / "p.png").is_file() and not (tmp_path / "p.png").exists()


def test_training_on_user_latents_noises_them_to_the_full_steps(dit_pipe):
    from dualcache_diffusers.l2c.data import trajectories_from_latents

    latents = torch.randn(2, 4, 16, 16)
    data = trajectories_from_latents(dit_pipe, "dit", STEPS, latents, [1, 2], [0, 2, 4], seed=0)
    assert data.hidden.shape == (STEPS, 4, 4, 16, 16) and data.uncond_rows is not None
    # CFG rows of one image share its latent; the pipeline's null class is the unconditional row
    for start in (0, 2, 4):
        torch.testing.assert_close(data.hidden[start, data.cond_rows], data.hidden[start, data.uncond_rows])
    assert data.cond["class_labels"][data.uncond_rows].tolist() == [1000, 1000]
    assert data.cond["class_labels"][data.cond_rows].tolist() == [1, 2]
    plan = train_router(dit_pipe, num_inference_steps=STEPS, budget=0.75, latents=latents, conditions=[1, 2],
                        iterations=3, batch_size=2)
    assert plan.metadata["flops_fraction"] == pytest.approx(0.75, abs=0.1)


def test_latent_loss_space_weights_steps_by_the_ddim_coefficient():
    from diffusers import DDIMScheduler

    from dualcache_diffusers.l2c.trainer import step_weights

    scheduler = DDIMScheduler(beta_schedule="linear", timestep_spacing="trailing")
    scheduler.set_timesteps(10)
    timesteps = scheduler.timesteps.float()
    assert torch.equal(step_weights(scheduler, timesteps, "eps"), torch.ones(10))
    weights = step_weights(scheduler, timesteps, "latent")
    assert weights.mean().item() == pytest.approx(1.0, rel=1e-5)
    # by hand for the first step: c = sqrt(1 - a_next) - sqrt(a_next (1 - a) / a), weight ~ c^2
    alphas = scheduler.alphas_cumprod.double()
    a, a_next = alphas[int(timesteps[0])], alphas[int(timesteps[1])]
    c0 = (1 - a_next).sqrt() - (a_next * (1 - a) / a).sqrt()
    a, a_next = alphas[int(timesteps[-1])], torch.tensor(1.0, dtype=torch.float64)
    c_last = (1 - a_next).sqrt() - (a_next * (1 - a) / a).sqrt()
    assert (weights[0] / weights[-1]).item() == pytest.approx((c0 / c_last).pow(2).item(), rel=1e-4)
    assert weights[0] > weights[5] > weights[8]  # noisy steps count more
    with pytest.raises(ValueError, match=r"loss_space='x0'.*'eps', 'latent'"):
        step_weights(scheduler, timesteps, "x0")


def test_latent_loss_space_trains_and_is_recorded(dit_pipe):
    plan = train_router(dit_pipe, STEPS, budget=0.7, kind="l2c", iterations=3, num_images=2, batch_size=2,
                        loss_space="eps")
    assert plan.metadata["learned"]["loss_space"] == "eps"


@pytest.mark.parametrize(("budget", "interval"), [(0.5, 3), (0.36, 4), (None, 2)])
def test_defaults_are_the_settings_that_measured_best(dit_pipe, budget, interval):
    """Issue 11: the latent loss and an interval from the budget (3 at 0.5, 4 at 0.36: the README's measured
    winners over FORA); the published interval 2 only for the threshold export."""
    plan = train_router(dit_pipe, 12, budget=budget, kind="l2c", iterations=1, num_images=2, batch_size=2)
    learned = plan.metadata["learned"]
    assert learned["loss_space"] == "latent" and learned["interval"] == interval, learned
    assert learned["forecast_order"] == 1 and all(s.forecast_order == 1 for s in plan.steps if not s.is_full)


def test_bad_loss_space_fails_before_any_trajectory_is_generated(dit_pipe, monkeypatch):
    from dualcache_diffusers.l2c import trainer

    def no_data(*args, **kwargs):
        raise AssertionError("trajectories generated before the arguments were checked")

    monkeypatch.setattr(trainer, "generate_trajectories", no_data)
    with pytest.raises(ValueError, match=r"loss_space='x0'.*'eps', 'latent'"):
        train_router(dit_pipe, STEPS, budget=0.7, iterations=2, loss_space="x0")


def test_resume_refuses_a_checkpoint_of_another_loss_space(tmp_path, dit_pipe):
    common = dict(num_inference_steps=STEPS, budget=0.7, kind="l2c", num_images=2, batch_size=2)
    train_router(dit_pipe, iterations=2, checkpoint=tmp_path / "ckpt", loss_space="latent", **common)
    with pytest.raises(ValueError, match=r"loss_space='latent', not 'eps'"):
        train_router(dit_pipe, iterations=4, resume=tmp_path / "ckpt", loss_space="eps", **common)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_training_images_never_start_from_the_noise_of_a_benchmark_image(dit_pipe, monkeypatch, seed):
    # bench evaluates on seeds 0, 1, ... and calibrates on 1000s / 2000s: a training trajectory drawn from one of
    # those seeds would start from an evaluated image's noise
    from dualcache_diffusers.l2c import data

    used = []
    real = data._pipeline_call
    monkeypatch.setattr(data, "_pipeline_call", lambda *a, **k: used.append(a[5]) or real(*a, **k))
    data.generate_trajectories(dit_pipe, "dit", STEPS, 10, seed, chunk=4)
    assert len(used) == 3 and len(set(used)) == 3
    assert not set(used) & set(range(3000))
