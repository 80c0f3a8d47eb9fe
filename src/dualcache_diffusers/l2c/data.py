"""Training data for the routers: the denoiser's own inputs and outputs along sampling trajectories.

Data-free (default): the pipeline generates images from random noise and random classes (or a
prompt list) with its own scheduler at the target step count, classifier-free guidance on; a hook
on the denoiser records, for every call, its latent input, timestep and output (the teacher), and
the conditioning of both CFG rows. The unconditional row is what label / prompt dropout picks:
DiT's null class 1000, PixArt's empty-prompt embedding, exactly as the pipeline builds them.

Pipelines that call the denoiser once per CFG branch (Wan, Chroma, Lumina2, QwenImage, CogView4,
HunyuanVideo 1.5, Flux with true CFG) are recorded call by call: the calls of one step share its
timestep, and the step's calls are merged along the rows in call order (the conditional branch
first, as every diffusers pipeline calls it), so the data looks like a batched-CFG pipeline's. The
router is trained on that batched call, which a model that treats rows independently computes the
same. Steps with a varying number of calls (Lumina2's ``cfg_trunc_ratio``, SD3's skip-layer
guidance) and calls that cannot share one batch (other inputs than the rows differ) are refused.

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
    """Records every denoiser call (input, timestep, output) and the call kwargs of the first step's calls.

    ``stop``: None records the whole generation, ``"call"`` stops it at the first call and ``"step"`` at
    the first call of the second step (a probe of every branch's conditioning).
    """

    def __init__(self, model: torch.nn.Module, stop: str | None = None, shared: tuple[str, ...] = ()) -> None:
        self.model = model
        self.stop = stop
        self.shared_names = shared
        self.hidden: list[torch.Tensor] = []
        self.timesteps: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.inputs: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (cond, shared) of the first step's calls
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
        first_step = not self.timesteps or (len(self.inputs) == len(self.timesteps)
                                            and _step_key(t) == _step_key(self.timesteps[0]))
        if self.stop == "step" and not first_step:
            raise _StopProbe
        if first_step:
            self.inputs.append(self._split_inputs(kwargs, hidden.shape[0]))
        self.hidden.append(hidden.detach().clone())
        self.timesteps.append(t.detach().clone())
        if self.stop == "call":
            raise _StopProbe

    def _split_inputs(self, kwargs: dict[str, Any], rows: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """The call's per-row conditioning and its inputs shared by every row, detached copies."""
        inputs = {k: v for k, v in kwargs.items() if k not in _SKIP_KWARGS}
        shared = {k for k, v in inputs.items() if k in self.shared_names or (
            isinstance(v, torch.Tensor) and (v.ndim == 0 or v.shape[0] != rows))}
        clone = lambda x: x.detach().clone()  # noqa: E731
        return (map_tree({k: v for k, v in inputs.items() if k not in shared}, clone),
                map_tree({k: v for k, v in inputs.items() if k in shared}, clone))

    def _post(self, module, args, kwargs, output):
        self.outputs.append(_first_output(output).detach().clone())

    @property
    def branches(self) -> int:
        """Denoiser calls per step (1: batched CFG or none; 2: a call per CFG branch), from the first step."""
        return len(self.inputs)

    def branch_inputs(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The conditioning of every row of the first step's calls, in call order, and the shared inputs."""
        per_row = {k for cond, _ in self.inputs for k in cond}
        conds, shareds = zip(*(_broadcast(cond, shared, per_row, hidden.shape[0])
                               for (cond, shared), hidden in zip(self.inputs, self.hidden)))
        for i in range(1, len(conds)):
            problem = _mismatch(conds[0], conds[i], rows=True) or _mismatch(shareds[0], shareds[i], rows=False)
            if problem:
                raise RuntimeError(
                    f"the pipeline calls the denoiser {len(conds)} times per step (once per guidance branch) and "
                    f"call {i + 1} differs from call 1: {problem}. The router trainer batches a step's calls into "
                    "one, which needs the same inputs apart from the rows: encode the prompt and the negative prompt "
                    "to one text length (negative_prompt_embeds in pipeline_kwargs must have the prompt's length; "
                    "max_sequence_length pads both) and turn off guidance that changes the model per call"
                )
        return cat_trees(list(conds)), shareds[0]


def _broadcast(cond: dict[str, Any], shared: dict[str, Any], per_row: set[str],
               rows: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A call's inputs with the batch-1 tensors that other calls pass per row expanded to its rows (Flux's
    true CFG encodes a single negative prompt once for every image)."""
    moved = {k: v.expand(rows, *v.shape[1:]) for k, v in shared.items()
             if k in per_row and isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == 1}
    return {**cond, **moved}, {k: v for k, v in shared.items() if k not in moved}


def _step_key(t: torch.Tensor) -> float:
    """The step's timestep: calls of one step share it (per-token timesteps: their largest value)."""
    return float(t.detach().max())


def _mismatch(a: Any, b: Any, rows: bool, name: str = "") -> str | None:
    """How two calls' inputs differ where they cannot share one batch, or None.

    ``rows``: tensors are per row (equal shapes but for the rows); otherwise they must be equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"kwargs {sorted(set(a) ^ set(b))} are passed to one call only"
        return next((m for k in a if (m := _mismatch(a[k], b[k], rows, f"{name}.{k}" if name else k))), None)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if rows and a.shape[1:] != b.shape[1:]:
            return f"{name!r} has shapes {tuple(a.shape)} and {tuple(b.shape)}"
        if not rows and (a.shape != b.shape or not torch.equal(a, b)):
            return f"{name!r} (the same for every row) differs"
        return None
    same = type(a) is type(b) and bool(a == b)
    return None if same else f"{name!r} is {a!r} in one call and {b!r} in the other"


def _calls_per_step(rec: _Recorder, num_steps: int) -> int:
    """The number of denoiser calls of every step (calls of one step share its timestep), checked."""
    sizes: list[int] = []
    for i, t in enumerate(rec.timesteps):
        if i and _step_key(t) == _step_key(rec.timesteps[i - 1]):
            sizes[-1] += 1
        else:
            sizes.append(1)
    if len(sizes) != num_steps:
        raise RuntimeError(
            f"the pipeline made {len(rec.timesteps)} denoiser calls at {len(sizes)} timesteps for "
            f"num_inference_steps={num_steps}; the router trainer needs one timestep per step (a scheduler "
            "that calls the model once per step, and one denoiser)"
        )
    if len(set(sizes)) > 1:
        raise RuntimeError(
            f"the pipeline calls the denoiser a varying number of times per step ({_runs(sizes)}); the router "
            "trainer batches the calls of a step into one and needs the same calls at every step: turn off what "
            "adds or drops a guidance call part way (Lumina2: pipeline_kwargs={'cfg_trunc_ratio': 1.0}; SD3: no "
            "skip_guidance_layers; a guider's start / stop)"
        )
    return sizes[0]


def _runs(sizes: list[int]) -> str:
    """``[2, 2, 1]`` -> ``"2 at steps 0-1, 1 at step 2"``."""
    parts, start = [], 0
    for i in range(1, len(sizes) + 1):
        if i == len(sizes) or sizes[i] != sizes[start]:
            steps = f"step {start}" if i - 1 == start else f"steps {start}-{i - 1}"
            parts.append(f"{sizes[start]} at {steps}")
            start = i
    return ", ".join(parts)


def _pairing(rows: int, images: int, family: str, branches: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Conditional and unconditional rows of each image.

    One call per step: the rows of a batched CFG call, in the family's order (``COND_FIRST``). Two calls per
    step (one per CFG branch, merged in call order): every diffusers pipeline calls the conditional branch
    first."""
    base = torch.arange(images)
    if branches > 2:
        raise RuntimeError(
            f"the pipeline calls the denoiser {branches} times per step; the router trainer pairs a conditional "
            "and an unconditional branch: turn off the extra guidance (e.g. SD3's skip_guidance_layers, a "
            "guider with more than two predictions)"
        )
    if rows == images and branches == 1:
        return base, None
    if rows != 2 * images:
        raise RuntimeError(f"the denoiser was called with {rows} rows for {images} images in {branches} call(s) "
                           "per step; cannot pair CFG rows")
    if branches == 2 or COND_FIRST.get(family, False):
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


def _merge_steps(calls: list[torch.Tensor], branches: int) -> torch.Tensor:
    """(steps, rows, ...) from the calls in order, the ``branches`` calls of a step along the rows."""
    return torch.stack([torch.cat(calls[i : i + branches]) for i in range(0, len(calls), branches)])


def _assemble(recorders: list[_Recorder], images: list[int], family: str, num_steps: int) -> TrajectoryData:
    parts_hidden, parts_t, parts_out, conds, shareds, cond_rows, uncond_rows = [], [], [], [], [], [], []
    offset = 0
    for rec, count in zip(recorders, images):
        branches = _calls_per_step(rec, num_steps)
        cond, shared = rec.branch_inputs()  # checks that the calls of a step can share one batch
        conds.append(cond)
        shareds.append(shared)
        parts_hidden.append(_merge_steps(rec.hidden, branches))
        parts_t.append(_merge_steps(rec.timesteps, branches))
        parts_out.append(_merge_steps(rec.outputs, branches))
        rows = parts_hidden[-1].shape[1]
        c, u = _pairing(rows, count, family, branches)
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
        shared=shareds[0],
    )


#: training trajectories draw their noise from seeds of their own: TRAJECTORY_SEEDS * (seed + 1) + image index
TRAJECTORY_SEEDS = 10_000


def trajectory_seed(seed: int, start: int) -> int:
    """The generator seed of the pipeline call that makes training images ``start``, ``start + 1``, ... for
    training seed ``seed``: 10000, 20000, ... for seeds 0, 1, ..., so that no training image starts from the
    noise of an image ``dualcache bench`` evaluates (seeds 0, 1, ...) or calibrates on (1000s, 2000s). (Before
    2026-11-23 it was ``seed + 1 + start``: two of the 100 benchmark images shared their noise and class with a
    training image.)"""
    return TRAJECTORY_SEEDS * (seed + 1) + start


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
            _pipeline_call(pipe, family, part, num_steps, guidance_scale, trajectory_seed(seed, start),
                           pipeline_kwargs or {})
        recorders.append(rec)
        sizes.append(len(part))
    return _assemble(recorders, sizes, family, num_steps)


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
    rec = _Recorder(model, stop="step", shared=shared)  # conditioning probe: the pipeline builds the CFG rows
    with rec:
        _pipeline_call(pipe, family, list(conditions), num_steps, None, seed, pipeline_kwargs or {})
    cond, shared_inputs = rec.branch_inputs()
    rows = sum(h.shape[0] for h in rec.hidden)
    cond_rows, uncond_rows = _pairing(rows, len(conditions), family, rec.branches)
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
                out = _first_output(model(model_in, timestep=t.expand(rows), **shared_inputs, **cond,
                                          return_dict=False))
            hidden[s], outputs[s] = model_in, out
            eps = out[:, :in_channels] if out.shape[1] == 2 * in_channels else out
            x = step_sched.step(eps, t, x).prev_sample
    return TrajectoryData(
        hidden=torch.stack(hidden),
        timesteps=torch.stack([timesteps[s].expand(rows) for s in range(num_steps)]),
        teacher=torch.stack(outputs),
        cond=cond,
        cond_rows=cond_rows,
        uncond_rows=uncond_rows,
        shared=shared_inputs,
    )
