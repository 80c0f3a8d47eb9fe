"""Training data for the routers: the denoiser's own inputs and outputs along sampling trajectories.

Data-free (default): the pipeline generates images from random noise and random classes (or a
prompt list) with its own scheduler at the target step count, classifier-free guidance on; a hook
on the denoiser records, for every call, its latent input, timestep and output (the teacher), and
the conditioning of both CFG rows. The unconditional row is what label / prompt dropout picks:
DiT's null class 1000, PixArt's empty-prompt embedding, exactly as the pipeline builds them.

From user latents: clean latents are noised to the first step of every full/cache cycle with the
scheduler's ``add_noise`` and rolled forward with the (uncached) model for the rest of the cycle.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

_SKIP_KWARGS = ("hidden_states", "timestep", "return_dict")
# Which half of a batched CFG call is the conditional one, per adapter family.
COND_FIRST = {"dit": True, "pixart": False}


class _StopProbe(Exception):
    pass


def map_tree(tree: Any, fn) -> Any:
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: map_tree(v, fn) for k, v in tree.items()}
    return tree


def cat_trees(trees: list[Any]) -> Any:
    first = trees[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(trees)
    if isinstance(first, dict):
        return {k: cat_trees([t[k] for t in trees]) for k in first}
    return first


def tree_tensors(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flatten the tensors of a kwargs tree to ``{"a.b": tensor}`` (for safetensors)."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(tree, torch.Tensor):
        out[prefix] = tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            out.update(tree_tensors(v, f"{prefix}.{k}" if prefix else k))
    return out


def tree_skeleton(tree: Any) -> Any:
    """JSON description of a kwargs tree: tensors become ``"<tensor>"``."""
    if isinstance(tree, torch.Tensor):
        return "<tensor>"
    if isinstance(tree, dict):
        return {k: tree_skeleton(v) for k, v in tree.items()}
    return tree


def tree_from(skeleton: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    if skeleton == "<tensor>":
        return tensors[prefix]
    if isinstance(skeleton, dict):
        return {k: tree_from(v, tensors, f"{prefix}.{k}" if prefix else k) for k, v in skeleton.items()}
    return skeleton


@dataclass
class TrajectoryData:
    """Per step ``s``: ``hidden[s]`` (rows, ...) denoiser inputs, ``timesteps[s]`` (rows,), ``teacher[s]`` outputs.

    ``cond`` holds the conditioning kwargs of every row (constant over steps) and ``shared`` the call
    kwargs that are not per row (Flux's ``img_ids`` / ``txt_ids``, see ``ModelAdapter.shared_inputs``);
    ``cond_rows[i]`` and ``uncond_rows[i]`` are the two rows of image ``i`` (``uncond_rows`` is None
    without guidance).
    """

    hidden: torch.Tensor  # (steps, rows, ...)
    timesteps: torch.Tensor  # (steps, rows)
    teacher: torch.Tensor  # (steps, rows, ...)
    cond: dict[str, Any]
    cond_rows: torch.Tensor
    uncond_rows: torch.Tensor | None
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return self.hidden.shape[0]

    @property
    def num_images(self) -> int:
        return self.cond_rows.shape[0]

    def to(self, device: torch.device | str) -> TrajectoryData:
        """The data on ``device`` (row indices stay on the CPU)."""
        move = lambda t: t.to(device)  # noqa: E731
        return TrajectoryData(move(self.hidden), move(self.timesteps), move(self.teacher), map_tree(self.cond, move),
                              self.cond_rows, self.uncond_rows, map_tree(self.shared, move))

    def call_kwargs(self, step: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Denoiser input and kwargs for one batch: row ``r`` at step ``step[r]``."""
        hidden = self.hidden[step, rows]
        kwargs = {"timestep": self.timesteps[step, rows], **self.shared, **map_tree(self.cond, lambda t: t[rows])}
        return hidden, kwargs

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {
            "hidden": self.hidden,
            "timesteps": self.timesteps,
            "teacher": self.teacher,
            "cond_rows": self.cond_rows,
        }
        if self.uncond_rows is not None:
            tensors["uncond_rows"] = self.uncond_rows
        tensors.update({f"cond.{k}": v for k, v in tree_tensors(self.cond).items()})
        tensors.update({f"shared.{k}": v for k, v in tree_tensors(self.shared).items()})
        meta = {"cond": tree_skeleton(self.cond)}
        if self.shared:
            meta["shared"] = tree_skeleton(self.shared)
        return {k: v.contiguous() for k, v in tensors.items()}, meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> TrajectoryData:
        cond_tensors = {k[len("cond.") :]: v for k, v in tensors.items() if k.startswith("cond.")}
        shared_tensors = {k[len("shared.") :]: v for k, v in tensors.items() if k.startswith("shared.")}
        return cls(
            hidden=tensors["hidden"],
            timesteps=tensors["timesteps"],
            teacher=tensors["teacher"],
            cond=tree_from(meta["cond"], cond_tensors),
            cond_rows=tensors["cond_rows"],
            uncond_rows=tensors.get("uncond_rows"),
            shared=tree_from(meta.get("shared", {}), shared_tensors),
        )


def _first_output(output: Any) -> torch.Tensor:
    if isinstance(output, tuple):
        return output[0]
    return output.sample if hasattr(output, "sample") else output


class _Recorder:
    def __init__(self, model: torch.nn.Module, stop_after_first: bool = False, shared: tuple[str, ...] = ()) -> None:
        self.model = model
        self.stop = stop_after_first
        self.shared_names = shared
        self.hidden: list[torch.Tensor] = []
        self.timesteps: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.cond: dict[str, Any] | None = None
        self.shared: dict[str, Any] = {}
        self.handles = []

    def __enter__(self) -> _Recorder:
        self.handles.append(self.model.register_forward_pre_hook(self._pre, with_kwargs=True))
        self.handles.append(self.model.register_forward_hook(self._post, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> bool:
        for h in self.handles:
            h.remove()
        return exc[0] is _StopProbe

    def _pre(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        t = torch.as_tensor(t, device=hidden.device)
        if t.ndim == 0:
            t = t.expand(hidden.shape[0])
        if self.cond is None:
            rows = hidden.shape[0]
            inputs = {k: v for k, v in kwargs.items() if k not in _SKIP_KWARGS}
            shared = {k for k, v in inputs.items() if k in self.shared_names or (
                isinstance(v, torch.Tensor) and (v.ndim == 0 or v.shape[0] != rows))}
            clone = lambda x: x.detach().clone()  # noqa: E731
            self.cond = map_tree({k: v for k, v in inputs.items() if k not in shared}, clone)
            self.shared = map_tree({k: v for k, v in inputs.items() if k in shared}, clone)
        self.hidden.append(hidden.detach().clone())
        self.timesteps.append(t.detach().clone())
        if self.stop:
            raise _StopProbe

    def _post(self, module, args, kwargs, output):
        self.outputs.append(_first_output(output).detach().clone())


def _pairing(rows: int, images: int, family: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    base = torch.arange(images)
    if rows == images:
        return base, None
    if rows != 2 * images:
        raise RuntimeError(f"the denoiser was called with {rows} rows for {images} images; cannot pair CFG rows")
    if COND_FIRST.get(family, False):
        return base, base + images
    return base + images, base


def _pipeline_call(pipe, family: str, conditions: list[Any], steps: int, guidance: float | None, seed: int,
                   extra: dict[str, Any]) -> None:
    kwargs: dict[str, Any] = dict(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                                  output_type="pt", **extra)
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    if family == "dit":
        pipe(class_labels=conditions, **kwargs)
    else:
        pipe(prompt=conditions, **kwargs)


def default_conditions(pipe, family: str, count: int, generator: torch.Generator,
                       prompts: list[str] | None) -> list[Any]:
    if family == "dit":
        labels = getattr(pipe, "labels", None)
        num_classes = len(labels) if labels else 1000
        return torch.randint(0, num_classes, (count,), generator=generator).tolist()
    if not prompts:
        prompts = ["a photo of a cat", "a red car on a street", "a house with a garden", "a mountain at sunset"]
    index = torch.randint(0, len(prompts), (count,), generator=generator).tolist()
    return [prompts[i] for i in index]


def _assemble(recorders: list[_Recorder], images: list[int], family: str) -> TrajectoryData:
    parts_hidden, parts_t, parts_out, conds, cond_rows, uncond_rows = [], [], [], [], [], []
    offset = 0
    for rec, count in zip(recorders, images):
        parts_hidden.append(torch.stack(rec.hidden))
        parts_t.append(torch.stack(rec.timesteps))
        parts_out.append(torch.stack(rec.outputs))
        conds.append(rec.cond)
        rows = rec.hidden[0].shape[0]
        c, u = _pairing(rows, count, family)
        cond_rows.append(c + offset)
        uncond_rows.append(None if u is None else u + offset)
        offset += rows
    return TrajectoryData(
        hidden=torch.cat(parts_hidden, dim=1),
        timesteps=torch.cat(parts_t, dim=1),
        teacher=torch.cat(parts_out, dim=1),
        cond=cat_trees(conds),
        cond_rows=torch.cat(cond_rows),
        uncond_rows=None if any(u is None for u in uncond_rows) else torch.cat(uncond_rows),
        shared=recorders[0].shared,
    )


def generate_trajectories(
    pipe,
    family: str,
    num_steps: int,
    num_images: int,
    seed: int,
    guidance_scale: float | None = None,
    prompts: list[str] | None = None,
    chunk: int = 8,
    pipeline_kwargs: dict[str, Any] | None = None,
    shared: tuple[str, ...] = (),
) -> TrajectoryData:
    """Data-free training data: the uncached pipeline's own trajectories from random noise."""
    generator = torch.Generator().manual_seed(seed)
    conditions = default_conditions(pipe, family, num_images, generator, prompts)
    recorders, sizes = [], []
    for start in range(0, num_images, chunk):
        part = conditions[start : start + chunk]
        rec = _Recorder(pipe.transformer, shared=shared)
        with rec:
            _pipeline_call(pipe, family, part, num_steps, guidance_scale, seed + 1 + start, pipeline_kwargs or {})
        if len(rec.hidden) != num_steps:
            per_step = len(rec.hidden) / num_steps
            hint = (f": it calls the denoiser {per_step:g} times per step (once per CFG branch), and the router "
                    "trainer records one call per step; train without guidance (guidance_scale=1.0, or the "
                    "pipeline's own switch) or on a pipeline that batches CFG") if per_step in (2, 3) else ""
            raise RuntimeError(
                f"the pipeline made {len(rec.hidden)} denoiser calls for num_inference_steps={num_steps}{hint}"
            )
        recorders.append(rec)
        sizes.append(len(part))
    return _assemble(recorders, sizes, family)


def trajectories_from_latents(
    pipe,
    family: str,
    num_steps: int,
    latents: torch.Tensor,
    conditions: list[Any],
    cycle_starts: list[int],
    seed: int,
    pipeline_kwargs: dict[str, Any] | None = None,
    shared: tuple[str, ...] = (),
) -> TrajectoryData:
    """Training data from clean latents (e.g. VAE-encoded images) and their classes / prompts.

    Each latent is noised to the timestep of every full step (``cycle_starts``) and the uncached
    model is rolled forward with the scheduler until the next full step, for both CFG rows.
    """
    if latents.shape[0] != len(conditions):
        raise ValueError(f"latents has {latents.shape[0]} samples but {len(conditions)} classes/prompts were given")
    model = pipe.transformer
    rec = _Recorder(model, stop_after_first=True, shared=shared)  # conditioning probe: the pipeline builds CFG rows
    with rec:
        _pipeline_call(pipe, family, list(conditions), num_steps, None, seed, pipeline_kwargs or {})
    rows = rec.hidden[0].shape[0]
    cond_rows, uncond_rows = _pairing(rows, len(conditions), family)
    row_image = torch.empty(rows, dtype=torch.long)  # the image each row belongs to (both CFG rows share it)
    row_image[cond_rows] = torch.arange(len(conditions))
    if uncond_rows is not None:
        row_image[uncond_rows] = torch.arange(len(conditions))
    x0 = latents[row_image].to(rec.hidden[0].device, rec.hidden[0].dtype)
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps
    generator = torch.Generator().manual_seed(seed)
    hidden = [None] * num_steps
    outputs = [None] * num_steps
    ends = [*cycle_starts[1:], num_steps]
    in_channels = latents.shape[1]
    for start, end in zip(cycle_starts, ends):
        step_sched = copy.deepcopy(pipe.scheduler)
        step_sched.set_timesteps(num_steps)
        if hasattr(step_sched, "set_begin_index"):
            step_sched.set_begin_index(start)
        noise = torch.randn(latents.shape, generator=generator)[row_image].to(x0)
        x = scheduler.add_noise(x0, noise, timesteps[start].expand(x0.shape[0]))
        for s in range(start, end):
            t = timesteps[s]
            model_in = step_sched.scale_model_input(x, t)
            with torch.no_grad():
                out = _first_output(model(model_in, timestep=t.expand(rows), **rec.shared, **rec.cond,
                                          return_dict=False))
            hidden[s], outputs[s] = model_in, out
            eps = out[:, :in_channels] if out.shape[1] == 2 * in_channels else out
            x = step_sched.step(eps, t, x).prev_sample
    return TrajectoryData(
        hidden=torch.stack(hidden),
        timesteps=torch.stack([timesteps[s].expand(rows) for s in range(num_steps)]),
        teacher=torch.stack(outputs),
        cond=rec.cond,
        cond_rows=cond_rows,
        uncond_rows=uncond_rows,
        shared=rec.shared,
    )
