"""Router training on any supported pipeline, through the adapter.

One iteration (Learning-to-Cache, generalised to cycles of ``interval`` steps):

1. draw ``batch_size`` rows: a trajectory image, a cycle (its full step ``f``), and with
   probability ``dropout`` the image's unconditional row (label / prompt dropout, so the CFG branch
   is trained too);
2. run the full step ``f`` (no gradient): every cached module's output goes to the cache;
3. for each cache step ``f + d`` of the cycle, run the router-mixed student on the trajectory's
   input at that step and compare with the teacher (the uncached model's output there);
4. loss = MSE + penalty; AdamW on the router logits only; logits clamped to [-5, 5].

Penalty: L2C uses ``l1 * sum(s)`` as published. With ``l1=None`` the weight is calibrated once
before training from the gradients at initialisation so that the branches whose benefit exceeds
``l1`` carry ``budget`` of the FLOPs. The dual router uses a Lagrangian on the expected FLOPs
fraction: ``lambda * ref * (E[flops fraction] - budget)``, ``lambda >= 0`` raised by dual ascent while
over budget; ``ref`` is the MSE of reusing everything (a scale, measured once).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..adapters import find_adapter
from ..api import disable_dual_cache
from ..config import DualCacheConfig
from .costs import PlanCost, measure_plan_cost
from .data import TrajectoryData, _first_output, generate_trajectories, trajectories_from_latents
from .mixing import Mixer
from .router import RouterSpec, TrainedRouter, check_forecast_order, check_logits, expected_fraction, probabilities

logger = logging.getLogger(__name__)

KINDS = ("l2c", "dual")
CHECKPOINT_VERSION = 1


def _check(name: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed; {allowed}")


LOSS_SPACES = ("eps", "latent")


def step_weights(scheduler: Any, timesteps: torch.Tensor, loss_space: str) -> torch.Tensor:
    """Per-step weight of the student's squared error (mean 1 over the steps).

    ``"eps"``: 1 everywhere, the published objective (error of the model output). ``"latent"``: the
    error where the sampler puts it, in the next latent. A DDIM step moves ``x_t`` to
    ``x_next = sqrt(a_next) * (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) + sqrt(1 - a_next) eps``, so an
    error ``e`` in ``eps`` lands as ``c_t * e`` with ``c_t = sqrt(1 - a_next) - sqrt(a_next * (1 - a_t) / a_t)``
    (``a`` = ``alphas_cumprod``, ``a_next`` = 1 after the last step); the weight is ``c_t ** 2``. It is
    large at the noisy steps, where the eps-space error of L2C under-counts what a reused output costs
    the image. First order for multistep solvers; falls back to ``"eps"`` for schedulers without
    ``alphas_cumprod`` (flow matching).
    """
    _check("loss_space", loss_space, loss_space in LOSS_SPACES, f"allowed: {', '.join(map(repr, LOSS_SPACES))}")
    ones = torch.ones(len(timesteps))
    if loss_space == "eps":
        return ones
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        logger.warning("%s has no alphas_cumprod: loss_space='latent' falls back to 'eps'", type(scheduler).__name__)
        return ones
    alphas = torch.as_tensor(alphas, dtype=torch.float64)
    t = timesteps.detach().cpu().round().long().clamp(0, len(alphas) - 1)
    a = alphas[t]
    a_next = torch.cat([a[1:], torch.ones(1, dtype=torch.float64)])
    coeff = (1 - a_next).sqrt() - (a_next * (1 - a) / a).sqrt()
    weight = coeff.pow(2)
    return (weight / weight.mean()).float()


class RouterTrainer:
    def __init__(
        self,
        pipe: Any,
        spec: RouterSpec,
        data: TrajectoryData,
        *,
        budget: float | None,
        lr: float,
        l1: float | None,
        batch_size: int,
        dropout: float,
        seed: int,
        init: str,
        loss_space: str = "latent",
        calibration_batches: int = 4,
        dual_step: float = 0.5,
    ) -> None:
        self.pipe = pipe
        self.model = pipe.transformer
        self.adapter = find_adapter(self.model)
        self.family = self.adapter.family(self.model)
        self.spec = spec
        self.data = data
        self.budget = budget
        self.lr = lr
        self.l1 = l1
        self.batch_size = batch_size
        self.dropout = dropout
        self.seed = seed
        self.calibration_batches = calibration_batches
        self.dual_step = dual_step
        self.loss_space = loss_space
        self.step_weight = step_weights(pipe.scheduler, data.timesteps[:, 0], loss_space).to(data.hidden.device)
        self.generator = torch.Generator().manual_seed(seed)
        shape = spec.logit_shape
        if init == "randn":  # as the authors' code
            logits = torch.randn(shape, generator=self.generator)
        elif init == "zeros":
            logits = torch.zeros(shape)
        else:
            raise ValueError(f"init={init!r} is not supported; allowed: 'zeros', 'randn'")
        self.device = data.hidden.device
        self.logits = torch.nn.Parameter(logits.to(self.device))
        self.optimizer = torch.optim.AdamW([self.logits], lr=lr, weight_decay=0.0)
        self.iteration = 0
        self.lam = 1.0
        self.ref = float("nan")
        self.losses: list[float] = []
        cfg = DualCacheConfig.from_preset("duca", self.family)
        self.selection = dict(
            staleness_weight=cfg.staleness_weight, interval=cfg.interval, cell=cfg.spatial_grid,
            bonus=cfg.spatial_bonus,
        )
        if spec.kind == "dual":
            self._check_rows_share_a_batch()
        rows = data.cond_rows[:1]
        hidden, kwargs = data.call_kwargs(torch.zeros(1, dtype=torch.long), rows)
        self.token_grid = self.adapter.token_grid(self.model, (hidden,), kwargs)
        frames, rows, cols = self.token_grid
        self.grid = (rows, cols) if frames == 1 else None
        self.cost: PlanCost = measure_plan_cost(
            self.model, self.adapter, lambda: self.model(hidden, **kwargs, return_dict=False), self.token_grid,
            batch=hidden.shape[0],
        )
        cache_index = torch.full((spec.num_steps,), -1, dtype=torch.long)
        for i, s in enumerate(spec.cache_steps):
            cache_index[s] = i
        self.cache_index = cache_index
        self.full_steps = torch.tensor(spec.full_steps, dtype=torch.long)

    def _check_rows_share_a_batch(self) -> None:
        """The dual router selects tokens in batches of any rows (both CFG branches of every image): the adapter
        must place the tokens of all of them alike (Lumina2 refuses captions of different lengths in one batch)."""
        rows = torch.arange(self.data.hidden.shape[1])
        hidden, kwargs = self.data.call_kwargs(torch.zeros(len(rows), dtype=torch.long), rows)
        try:
            self.adapter.token_grid(self.model, (hidden,), kwargs)
        except ValueError as error:
            raise ValueError(
                f"kind='dual' trains token selections on batches of the training rows, which cannot share one "
                f"batch here ({error}); train kind='l2c' (no token selection), or use prompts and a negative "
                "prompt of one token length"
            ) from None

    def mixer(self) -> Mixer:
        """The training hooks for this model and its token grid (enter them with ``with``)."""
        return Mixer(self.model, self.adapter, self.token_grid)

    # ---- one batch ---------------------------------------------------------------------------
    def _draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.generator
        cycles = torch.randint(0, len(self.full_steps), (self.batch_size,), generator=g)
        images = torch.randint(0, self.data.num_images, (self.batch_size,), generator=g)
        drop = torch.rand(self.batch_size, generator=g) < self.dropout
        rows = self.data.cond_rows[images]
        if self.data.uncond_rows is not None:
            rows = torch.where(drop, self.data.uncond_rows[images], rows)
        return self.full_steps[cycles], rows

    def _warm_up(self, mixer: Mixer, probs: torch.Tensor, starts: torch.Tensor, rows: torch.Tensor) -> None:
        """Forecasting: the cycle before ``starts`` (its full step, then its cache steps with the router), so that
        the history the engine forecasts from at the drawn cycle is there: the engine's history holds a module's
        last computations, and the previous cycle's cache steps that computed it are among them. Rows in the
        first cycle have no previous one (their history starts at their full step). No gradient: the previous
        cycle's routers are trained on their own cycle. The dual router's partial steps there select their rows
        as the engine does (scores of the cycle's full step, staleness from it), since what they recompute feeds
        the computations the history holds."""
        spec = self.spec
        mixer.reset()
        mixer.start_forecast(spec.forecast_order)
        previous = starts - spec.interval
        has_previous = previous >= 0
        mixer.fresh = torch.ones(len(starts), dtype=torch.bool, device=self.device)
        if not has_previous.any():
            mixer.fresh = ~has_previous.to(self.device)
            return
        with torch.no_grad():
            for d in range(spec.interval):
                steps = (previous + d).clamp(min=0)
                mixer.offset = d
                if d:
                    mixer.weights = probs[self.cache_index[steps].clamp(min=0)].detach()
                    if spec.kind == "dual":  # its partial steps' rows, selected as at the drawn cycle
                        mixer.update_masks(spec.partial_ratio, self.grid, **self.selection, weights=mixer.weights)
                mixer.mode = "record" if d == 0 else "mix"
                hidden, kwargs = self.data.call_kwargs(steps, rows)
                self.model(hidden, **kwargs, return_dict=False)
        mixer.fresh = ~has_previous.to(self.device)
        mixer.staleness.clear()  # the engine's token staleness restarts at every full step

    def _batch_loss(self, mixer: Mixer, probs: torch.Tensor, starts: torch.Tensor, rows: torch.Tensor):
        """Sum of per-row MSEs over the valid (row, cache step) pairs, their number, and per-step counts."""
        spec = self.spec
        base = 0
        if spec.forecast_order:
            self._warm_up(mixer, probs, starts, rows)
            base = mixer.offset = spec.interval
        else:
            mixer.reset()
        mixer.mode = "record"
        hidden, kwargs = self.data.call_kwargs(starts, rows)
        with torch.no_grad():
            self.model(hidden, **kwargs, return_dict=False)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        used = torch.zeros(len(spec.cache_steps))
        l1_sum = torch.zeros((), dtype=probs.dtype, device=self.device)
        for d in range(1, spec.interval):
            steps = starts + d
            valid = steps < spec.num_steps
            if not valid.any():
                break
            steps = steps.clamp(max=spec.num_steps - 1)
            index = self.cache_index[steps].clamp(min=0)
            mixer.weights = probs[index]
            if spec.kind == "dual":
                mixer.update_masks(spec.partial_ratio, self.grid, **self.selection, weights=mixer.weights)
            mixer.mode = "mix"
            mixer.offset = base + d
            hidden, kwargs = self.data.call_kwargs(steps, rows)
            out = _first_output(self.model(hidden, **kwargs, return_dict=False))
            teacher = self.data.teacher[steps, rows]
            mse = (out.float() - teacher.float()).pow(2).flatten(1).mean(dim=1) * self.step_weight[steps]
            weight = valid.to(self.device)
            total = total + (mse * weight).sum().double()
            count += int(valid.sum())
            used += torch.bincount(index[valid], minlength=len(spec.cache_steps)).float()
            if spec.kind == "l2c":
                l1_sum = l1_sum + (probs[index].flatten(1).sum(dim=1) * weight).sum()
        mixer.mode = "off"
        return total, count, used, l1_sum

    # ---- calibration (once, before the first iteration) -----------------------------------------
    def _calibrate(self, mixer: Mixer) -> None:
        spec = self.spec
        if spec.kind == "l2c" and self.l1 is None:
            s = torch.sigmoid(self.logits.detach()).requires_grad_(True)
            grads = torch.zeros_like(s)
            used = torch.zeros(len(spec.cache_steps))
            for _ in range(self.calibration_batches):
                starts, rows = self._draw()
                total, count, u, _ = self._batch_loss(mixer, s, starts, rows)
                (g,) = torch.autograd.grad(total / max(count, 1), s)
                grads += g * count
                used += u
            seen = used > 0
            grads, s = grads.cpu(), s.detach().cpu()
            importance = torch.full_like(s, float("nan"))
            importance[seen] = -grads[seen] / used[seen].view(-1, *([1] * (s.ndim - 1)))
            importance = torch.nan_to_num(importance, nan=float(importance[seen].median()))
            self.l1 = _l1_for_budget(spec, importance, self.cost, self.budget if self.budget is not None else 0.5)
            logger.info("calibrated l1=%.3g for budget %s", self.l1, self.budget)
        if spec.kind == "dual" and not math.isfinite(self.ref):
            reuse = torch.zeros(spec.logit_shape, device=self.device)
            reuse[..., 2] = 1.0
            acc, n = 0.0, 0
            with torch.no_grad():
                for _ in range(self.calibration_batches):
                    starts, rows = self._draw()
                    total, count, _, _ = self._batch_loss(mixer, reuse, starts, rows)
                    acc, n = acc + float(total), n + count
            self.ref = max(acc / max(n, 1), 1e-12)

    # ---- loop ---------------------------------------------------------------------------------
    def train(self, iterations: int, checkpoint: Path | None = None, checkpoint_every: int = 100,
              progress: bool = False) -> TrainedRouter:
        spec = self.spec
        params = [p for p in self.model.parameters()]
        was_grad = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            with self.mixer() as mixer:
                if self.iteration == 0:
                    self._calibrate(mixer)
                bar = None
                if progress:
                    from tqdm.auto import tqdm

                    bar = tqdm(total=iterations, initial=self.iteration, desc=f"train {spec.kind} router")
                while self.iteration < iterations:
                    starts, rows = self._draw()
                    probs = probabilities(spec, self.logits)
                    total, count, _, l1_sum = self._batch_loss(mixer, probs, starts, rows)
                    mse = total / max(count, 1)
                    if spec.kind == "l2c":
                        loss = mse + self.l1 * l1_sum / max(count, 1)
                    else:
                        frac = expected_fraction(spec, probs, self.cost)
                        loss = mse + self.lam * self.ref * (frac - self.budget)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                    with torch.no_grad():
                        self.logits.clamp_(-5.0, 5.0)
                        if spec.kind == "dual":
                            gap = float(frac.detach()) - self.budget
                            self.lam = max(0.0, self.lam + self.dual_step * gap / max(self.budget, 1e-6))
                    self.losses.append(float(mse.detach()))
                    self.iteration += 1
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(mse=f"{self.losses[-1]:.4g}")
                    due = self.iteration % checkpoint_every == 0 or self.iteration == iterations
                    if checkpoint is not None and due:
                        self.save(checkpoint)
                if bar is not None:
                    bar.close()
        finally:
            for p, flag in zip(params, was_grad):
                p.requires_grad_(flag)
        return self.result()

    def result(self) -> TrainedRouter:
        logits = self.logits.detach().cpu().clone()
        return TrainedRouter(self.spec, logits, self.cost, self.metadata(), list(self.losses))

    def metadata(self) -> dict[str, Any]:
        sched = getattr(self.pipe, "scheduler", None)
        sched_config = json.loads(sched.to_json_string()) if sched is not None else None
        return {
            "learned": {
                "router": self.spec.kind,
                "num_inference_steps": self.spec.num_steps,
                "interval": self.spec.interval,
                "partial_ratio": self.spec.partial_ratio if self.spec.kind == "dual" else None,
                "iterations": self.iteration,
                "seed": self.seed,
                "lr": self.lr,
                "l1": self.l1,
                "loss_space": self.loss_space,
                "forecast_order": self.spec.forecast_order,
                "model": type(self.model).__name__,
            },
            "scheduler": {"class": type(sched).__name__ if sched is not None else None, "config": sched_config},
            "num_inference_steps": self.spec.num_steps,
        }

    # ---- checkpoints (safetensors + JSON, no pickles) ---------------------------------------------
    def save(self, path: Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = self.optimizer.state.get(self.logits, {})
        tensors = {"logits": self.logits.detach().cpu().contiguous(), "rng": self.generator.get_state()}
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in state:
                tensors[f"adam.{key}"] = torch.as_tensor(state[key]).cpu().contiguous()
        save_file(tensors, str(path / "router.safetensors"))
        data_file = path / "data.safetensors"
        if not data_file.exists():
            data_tensors, data_meta = self.data.to_tensors()
            save_file(data_tensors, str(data_file))
            (path / "data.json").write_text(json.dumps(data_meta))
        info = {
            "format": "dualcache-router-checkpoint",
            "version": CHECKPOINT_VERSION,
            "spec": self.spec.to_dict(),
            "iteration": self.iteration,
            "budget": self.budget,
            "lr": self.lr,
            "l1": self.l1,
            "lambda": self.lam,
            "ref": self.ref,
            "batch_size": self.batch_size,
            "dropout": self.dropout,
            "seed": self.seed,
            "losses": self.losses,
            "metadata": self.metadata(),
        }
        tmp = path / "state.json.tmp"
        tmp.write_text(json.dumps(info, indent=1))
        tmp.replace(path / "state.json")

    def load_state(self, path: Path) -> None:
        path = Path(path)
        info, tensors = read_checkpoint(path)
        if info["spec"] != self.spec.to_dict():
            raise ValueError(f"resume={str(path)!r} was trained with {info['spec']}, not {self.spec.to_dict()}")
        saved_space = info["metadata"]["learned"].get("loss_space", "eps")
        if saved_space != self.loss_space:
            raise ValueError(f"resume={str(path)!r} was trained with loss_space={saved_space!r}, "
                             f"not {self.loss_space!r}")
        check_logits(tensors["logits"], self.spec.logit_shape, f"checkpoint {str(path / 'router.safetensors')!r}")
        with torch.no_grad():
            self.logits.copy_(tensors["logits"])
        try:
            self.generator.set_state(tensors["rng"])
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"checkpoint {str(path)!r}: its random generator state is invalid: {error}") from None
        if "adam.exp_avg" in tensors:
            self.optimizer.state[self.logits] = {
                "step": tensors["adam.step"],
                "exp_avg": tensors["adam.exp_avg"].to(self.device),
                "exp_avg_sq": tensors["adam.exp_avg_sq"].to(self.device),
            }
        self.iteration = int(info["iteration"])
        self.l1 = info["l1"]
        self.lam = float(info["lambda"])
        self.ref = float(info["ref"]) if info["ref"] is not None else float("nan")
        self.losses = list(info["losses"])


def _checkpoint_error(path: Path, what: str) -> ValueError:
    return ValueError(f"resume={str(path)!r} is not a usable router checkpoint: {what}")


def _read_json(path: Path, checkpoint: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise _checkpoint_error(checkpoint, f"{path.name} is missing") from None
    except RecursionError:
        raise _checkpoint_error(checkpoint, f"{path.name} is nested too deeply") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:  # JSONDecodeError is a ValueError
        raise _checkpoint_error(checkpoint, f"{path.name} is not valid JSON ({error})") from None


def _read_safetensors(path: Path, checkpoint: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise _checkpoint_error(checkpoint, f"{path.name} is missing")
    try:
        return load_file(str(path))
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as error:  # safetensors raises its own SafetensorError on truncated / corrupted files
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise _checkpoint_error(checkpoint, f"{path.name} is truncated or corrupted ({detail})") from None


_STATE_TYPES = {"spec": dict, "iteration": int, "lambda": (int, float), "losses": list, "metadata": dict}


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``state.json`` and the tensors of ``router.safetensors`` of a checkpoint directory, checked: anything
    missing, truncated, corrupted or of another format is one ``ValueError`` naming the directory and file."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"resume={str(path)!r}: no router checkpoint directory there")
    info = _read_json(path / "state.json", path)
    if not isinstance(info, dict) or info.get("format") != "dualcache-router-checkpoint":
        raise _checkpoint_error(path, "state.json is not of the format 'dualcache-router-checkpoint'")
    if info.get("version") != CHECKPOINT_VERSION:
        raise _checkpoint_error(path, f"state.json has version {info.get('version')!r}; this library reads "
                                      f"version {CHECKPOINT_VERSION}")
    for key, kind in _STATE_TYPES.items():
        if isinstance(info.get(key), bool) or not isinstance(info.get(key), kind):
            raise _checkpoint_error(path, f"state.json entry {key!r} is missing or of the wrong type")
    if not all(k in info for k in ("l1", "ref")) or not isinstance(info["metadata"].get("learned"), dict):
        raise _checkpoint_error(path, "state.json lacks 'l1', 'ref' or 'metadata.learned'")
    for key in ("lambda", "l1", "ref"):  # ref is NaN until the dual router calibrates it
        value = info[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or math.isinf(value) or (math.isnan(value) and key != "ref")):
            raise _checkpoint_error(path, f"state.json entry {key!r} is not a finite number")
    tensors = _read_safetensors(path / "router.safetensors", path)
    for key in ("logits", "rng"):
        if key not in tensors:
            raise _checkpoint_error(path, f"router.safetensors has no {key!r} tensor")
    check_logits(tensors["logits"], source=f"checkpoint {str(path / 'router.safetensors')!r}")
    adam = [k for k in ("adam.exp_avg", "adam.exp_avg_sq", "adam.step") if k in tensors]
    if adam and len(adam) != 3:
        raise _checkpoint_error(path, "router.safetensors holds only part of the optimizer state")
    if adam and any(tensors[k].shape != tensors["logits"].shape for k in adam[:2]):
        raise _checkpoint_error(path, "router.safetensors: the optimizer state does not match the logits' shape")
    return info, tensors


def _l1_for_budget(spec: RouterSpec, importance: torch.Tensor, cost: PlanCost, budget: float) -> float:
    """l1 such that the branches whose MSE benefit exceeds it carry ``budget`` of the plan's FLOPs."""
    full, _ = cost.tensors(spec.partial_ratio)
    flops = full.expand_as(importance).flatten()
    total = spec.num_steps * float(cost.full_call())
    fixed = len(spec.full_steps) * float(cost.full_call()) + len(spec.cache_steps) * float(
        cost.overhead_model + cost.overhead_blocks
    )
    target = max(0.0, budget * total - fixed)
    order = importance.flatten().argsort(descending=True)
    cum = torch.cumsum(flops[order], 0)
    k = int((cum <= target).sum())
    values = importance.flatten()[order]
    if k == 0:
        value = float(values[0]) * 1.5
    elif k >= len(values):
        value = float(values[-1]) * 0.5
    else:
        value = 0.5 * float(values[k - 1] + values[k])
    return max(value, 1e-12)


def _load_data(path: Path) -> TrajectoryData:
    path = Path(path)
    tensors = _read_safetensors(path / "data.safetensors", path)
    meta = _read_json(path / "data.json", path)
    try:
        return TrajectoryData.from_tensors(tensors, meta)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
        raise _checkpoint_error(path, f"data.safetensors / data.json do not hold trajectories ({error!r})") from None


def train_router(
    pipe: Any,
    num_inference_steps: int = 20,
    budget: float | None = 0.5,
    kind: str = "l2c",
    iterations: int | None = None,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    resume: str | Path | None = None,
    *,
    threshold: float | None = None,
    lr: float = 1e-2,
    l1: float | None = None,
    interval: int | None = None,
    partial_ratio: float = 0.25,
    batch_size: int = 16,
    num_images: int = 32,
    dropout: float = 0.1,
    guidance_scale: float | None = None,
    prompts: list[str] | None = None,
    latents: torch.Tensor | None = None,
    conditions: list[Any] | None = None,
    init: str = "zeros",
    loss_space: str = "latent",
    forecast_order: int | None = None,
    checkpoint_every: int = 100,
    pipeline_kwargs: dict[str, Any] | None = None,
    progress: bool = False,
    return_router: bool = False,
) -> Any:
    """Learn a static cache schedule for ``pipe`` at ``num_inference_steps`` and export it as a plan.

    Args:
        pipe: a pipeline of a supported family (its ``transformer``; several block lists and modules
            present in some blocks only are fine; one denoiser call per step, or one per CFG branch,
            merged into one batched call, see :mod:`.data`); any dual cache on it is removed first.
        num_inference_steps: the step count the plan is for (recorded in its metadata).
        budget: target FLOPs fraction of the plan (cached / uncached denoiser FLOPs). L2C: the
            export threshold is chosen to hit it (None: published threshold export). Dual: required.
        kind: "l2c" (compute / reuse per branch, full and cache steps alternating) or "dual"
            (compute / partial / reuse per module, a full step every ``interval`` steps).
        iterations: optimizer steps (default 600).
        seed: fixes trajectories, batches and initialisation: the same seed gives the same plan.
        checkpoint: a directory written every ``checkpoint_every`` iterations and at the end.
        resume: a checkpoint directory to continue from (gives the same result as not stopping).
        threshold: L2C export threshold when ``budget`` is None (default 0.1, the published DiT value).
        lr: AdamW learning rate on the logits (the authors use 1e-3 for 50k iterations on 8 GPUs;
            1e-2 reaches a stable pattern in the few hundred iterations a CPU affords).
        l1: L2C penalty weight; None calibrates it for ``budget`` (see the module docstring).
        interval: cycle length (full step + interval-1 cache steps); default chosen from the budget (about
            75% of the budget spent by the full steps: 3 at 0.5, 4 at 0.36, which measured best), or 2 (the
            published L2C value) when an L2C router is exported by threshold (``budget=None``).
        partial_ratio: fraction of tokens a "partial" choice recomputes (dual).
        num_images, guidance_scale, prompts, pipeline_kwargs: data-free trajectories: how many
            images, CFG scale (pipeline default), PixArt prompts, extra pipeline call arguments.
        latents, conditions: train on clean latents with their class ids / prompts instead.
        loss_space: "latent" (default, ours: the error weighted by where the sampler puts it, see
            :func:`step_weights`; it beat "eps" at every budget measured) or "eps" (published: the error of
            the model output).
        forecast_order: what a cache step's reused branch is, at training as in the exported plan's cache
            steps: 0 the cached output (published), 1 the engine's linear forecast from the module's last two
            computations at their steps (plain reuse while only one is stored, as the engine does). Dual: a
            partial choice recomputes its rows into that forecast (the engine's default, without re-anchoring:
            only computations enter the history; see :mod:`.mixing`). Default (None): 1, which measured better
            for both kinds (docs/plans.md).
        return_router: also return the :class:`TrainedRouter` (``(plan, router)``).
    """
    _check("kind", kind, kind in KINDS, f"allowed: {', '.join(map(repr, KINDS))}")
    _check("loss_space", loss_space, loss_space in LOSS_SPACES, f"allowed: {', '.join(map(repr, LOSS_SPACES))}")
    if forecast_order is None:  # forecasting measured better for both routers
        forecast_order = 1
    check_forecast_order(kind, forecast_order)  # here too (RouterSpec checks it), before the pipeline is touched
    _check("num_inference_steps", num_inference_steps,
           isinstance(num_inference_steps, int) and num_inference_steps >= 2, "must be an integer >= 2")
    if budget is not None:
        _check("budget", budget, isinstance(budget, (int, float)) and 0 < budget <= 1, "must be in (0, 1]")
    if kind == "dual" and budget is None:
        raise ValueError("budget=None is not allowed for kind='dual'; pass the target FLOPs fraction, e.g. 0.4")
    _check("partial_ratio", partial_ratio, 0 < partial_ratio < 1, "must be in (0, 1)")
    _check("dropout", dropout, 0 <= dropout < 1, "must be in [0, 1)")
    _check("batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1, "must be an integer >= 1")
    iterations = 600 if iterations is None else iterations
    _check("iterations", iterations, isinstance(iterations, int) and iterations >= 1, "must be an integer >= 1")
    if interval is None:
        interval = 2 if budget is None else max(2, min(num_inference_steps, math.ceil(1.0 / (0.75 * budget))))
    _check("interval", interval, isinstance(interval, int) and 2 <= interval <= num_inference_steps,
           f"must be an integer in [2, num_inference_steps={num_inference_steps}]")
    min_fraction = math.ceil(num_inference_steps / interval) / num_inference_steps
    if budget is not None and budget < min_fraction * 0.9:
        raise ValueError(
            f"budget={budget} is below what interval={interval} allows (the full steps alone use about "
            f"{min_fraction:.2f} of the FLOPs); raise the budget or the interval"
        )
    model = getattr(pipe, "transformer", None)
    adapter = find_adapter(model)
    disable_dual_cache(pipe)
    spec = RouterSpec.from_layout(kind, num_inference_steps, adapter.layout(model), interval=interval,
                                  partial_ratio=partial_ratio, forecast_order=forecast_order)
    family = adapter.family(model)
    if resume is not None:
        resume = Path(resume)
        if not (resume / "state.json").is_file():
            raise FileNotFoundError(f"resume={str(resume)!r}: no router checkpoint (state.json) there")
        read_checkpoint(resume)  # fail on a broken checkpoint before anything else is loaded
        data = _load_data(resume).to(next(model.parameters()).device)
    elif latents is not None:
        if conditions is None:
            raise ValueError("latents=... needs conditions=[class id or prompt per latent]")
        data = trajectories_from_latents(pipe, family, num_inference_steps, latents, conditions, spec.full_steps,
                                         seed, pipeline_kwargs, shared=adapter.shared_inputs)
    else:
        data = generate_trajectories(pipe, family, num_inference_steps, num_images, seed, guidance_scale, prompts,
                                     pipeline_kwargs=pipeline_kwargs, shared=adapter.shared_inputs)
    if data.uncond_rows is None and dropout > 0:
        logger.warning("the pipeline ran without guidance: no unconditional rows, label dropout is off")
    trainer = RouterTrainer(pipe, spec, data, budget=budget, lr=lr, l1=l1, batch_size=batch_size, dropout=dropout,
                            seed=seed, init=init, loss_space=loss_space)
    if resume is not None:
        trainer.load_state(resume)
    router = trainer.train(iterations, Path(checkpoint) if checkpoint else None, checkpoint_every, progress)
    plan = router.export(budget=budget, threshold=threshold)
    return (plan, router) if return_router else plan
