"""The caching engine: diffusers ``ModelHook``s on the denoisers, their blocks and cached modules.

One engine serves one pipeline (or one bare transformer) and every denoiser in it (Wan 2.2 A14B has
two). What it needs to know about a model comes from the model's adapter, as data.

State. Everything one generation keeps (step, caches, token scores, statistics) lives in a
:class:`Generation` owned by the calling thread, so one pipeline can serve several threads at once.
A generation starts when a scheduler is given new timesteps in this thread (``scheduler_watch``
observes the scheduler classes, so a replaced scheduler, or another pipeline sharing the transformer
through ``from_pipe``, is followed), or, for a bare transformer, when the planned number of calls is
used up. Within a generation, each CFG branch (the
pipeline's ``cache_context`` name, the order of calls at one timestep for pipelines without one, and
the batch size) has its own :class:`BranchState`, and each denoiser its own caches in it.

Hooks. The denoiser hook opens a :class:`Call` (the step's plan, the branch and model state) in a
thread-local slot; block and module hooks read it. Blocks: the aggressive step skips the stack (each
block passes its streams through in the layout the model unpacks, the last returns the cached
output). Modules: compute and store, reuse, or recompute selected image rows (plus all text rows)
and scatter them into the cache; the block around them applies its current gates.

FLOPs. The first call of a denoiser for an input shape is counted with the same formulas as
``torch.utils.flop_counter.FlopCounterMode`` (a thread-local dispatch mode), attributed to the
model, each block, and each cached module; later calls add those per-part costs up, scaling partial
modules by the rows they compute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.utils import BaseOutput
from torch.utils._python_dispatch import TorchDispatchMode

from . import scheduler_watch
from .adapters import ModelAdapter
from .adapters.base import BlockInfo, ModuleSpec, resolve
from .budget import CostModel, samples_flow
from .cache_storage import CacheStorage
from .config import DualCacheConfig
from .forecast import ForecastWeights, combine, lagrange_weights
from .partial_attention import joint_flops, rotary_partial_attention
from .plan import SKIPPED_CALL, CachePlan, PlanLayout, StepPlan, action_of, full_plan, num_fresh_tokens
from .selection import (
    ERROR_SELECTIONS,
    attention_score,
    attention_score_flops,
    forecast_error,
    normalize_score,
    random_base,
    select_tokens,
    vnorm_score,
)
from .stats import CacheStats, ModuleCost, flop_formulas, weight_bytes

logger = logging.getLogger(__name__)

#: most denoiser calls in one step that are told apart as CFG branches (cond, uncond, skip-layer guidance)
MAX_BRANCHES = 4

HOOK_DENOISER = "dualcache_denoiser"
HOOK_BLOCK = "dualcache_block"
HOOK_MODULE = "dualcache_module"
HOOK_RECORD = "dualcache_record"
HOOK_INPUT_NORM = "dualcache_input_norm"
ALL_HOOKS = (HOOK_DENOISER, HOOK_BLOCK, HOOK_MODULE, HOOK_RECORD, HOOK_INPUT_NORM)
#: name prefixes of diffusers' own cache hooks, which cannot share a model with this engine
FOREIGN_CACHE_HOOKS = ("fbc_", "faster_cache", "mag_cache", "pyramid_attention_broadcast", "sea_cache",
                       "taylorseer_cache", "text_kv_cache")

# ------------------------------------------------------------------------------------------------
# What the engine knows about each denoiser (fixed at enable time)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CachedModule:
    block: int  # position of the block in execution order
    column: int  # the module's column in the plan
    name: str
    spec: ModuleSpec
    grid: str  # which token-grid axes the block's rows span
    cost: ModuleCost

    def call_kind(self, call: int) -> str:
        calls = self.spec.calls
        return calls[min(call, len(calls) - 1)]


class SoleReader(NamedTuple):
    """A cached module that alone reads the outputs of ``inputs``, other cached modules of its block."""

    reader: CachedModule
    inputs: tuple[CachedModule, ...]


@dataclass
class Costs:
    """FLOPs per call of one denoiser for one input shape, recorded at its first call."""

    model: int = 0  # outside every block
    blocks: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # inside a block, outside cached modules
    modules: dict[tuple[int, int, int], int] = field(default_factory=lambda: defaultdict(int))  # full module calls
    rows: dict[tuple[int, int, int], tuple[int, int]] = field(default_factory=dict)  # (query rows, kv rows)

    @property
    def per_call(self) -> int:
        return self.model + sum(self.blocks.values()) + sum(self.modules.values())


class Denoiser:
    """One denoiser of the pipeline: its adapter, blocks, cached modules and plans."""

    def __init__(self, model: torch.nn.Module, adapter: ModelAdapter, config: DualCacheConfig) -> None:
        self.model = model
        self.adapter = adapter
        self.config = config
        self.infos: list[BlockInfo] = adapter.block_infos(model)
        self.layout: PlanLayout = adapter.layout(model)
        columns = {name: i for i, name in enumerate(self.layout.modules)}
        self.modules: list[tuple[torch.nn.Module, CachedModule]] = [
            (getattr(info.block, spec.name),
             CachedModule(info.index, columns[spec.name], spec.name, spec, info.spec.grid,
                          ModuleCost.of(getattr(info.block, spec.name), spec.kernel)))
            for info in self.infos
            for spec in info.modules
        ]
        # norms whose output only cached modules read (adapter.input_norms): skipped where none of them computes
        readers: dict[torch.nn.Module, list[CachedModule]] = {}
        for _, cached in self.modules:
            info = self.infos[cached.block]
            paths = adapter.input_norms(info.block, info.spec).get(cached.name, ())
            for path in (paths,) if isinstance(paths, str) else paths:
                norm = resolve(info.block, path)
                if norm is not None:
                    readers.setdefault(norm, []).append(cached)
        self.input_norms: list[tuple[torch.nn.Module, tuple[CachedModule, ...]]] = [
            (norm, tuple(modules)) for norm, modules in readers.items()]
        # cached module -> the cached module that alone reads its output (the block list's sole_readers), with
        # every module it alone reads: their outputs meet (e.g. concatenated), so they return one row together
        by_name = {(cached.block, cached.name): cached for _, cached in self.modules}
        read_by: dict[tuple[int, str], list[CachedModule]] = {}
        for _, cached in self.modules:
            reader = self.infos[cached.block].spec.sole_readers.get(cached.name)
            if reader is not None and (cached.block, reader) in by_name:
                read_by.setdefault((cached.block, reader), []).append(cached)
        self.sole_readers: dict[tuple[int, int], SoleReader] = {  # by (block, column)
            (cached.block, cached.column): SoleReader(by_name[key], tuple(inputs))
            for key, inputs in read_by.items() for cached in inputs
        }
        self.plans: dict[Any, CachePlan] = {}  # by step count; budget plans by (step count, costs, window)
        self.costs: dict[tuple, Costs] = {}
        self.cost_models: dict[tuple, CostModel] = {}  # what each budget plan was built from (read by calibrate)
        self._weights: dict[tuple[tuple[float, ...], torch.device], ForecastWeights] = {}
        self._actions: dict[int, tuple[StepPlan, tuple[tuple[str, ...], ...]]] = {}
        self._steps: dict[tuple[int, bool], tuple[CachePlan, PlanSteps]] = {}  # per plan: derived per-step flags
        self.value_modules: dict[int, tuple[torch.nn.Module, torch.nn.Module, str]] = {}  # block -> (to_v, attn, rows)
        for info in self.infos:
            if info.spec.value:
                value = resolve(info.block, info.spec.value)
                attn = resolve(info.block, info.spec.value.rsplit(".", 1)[0]) if "." in info.spec.value else None
                if value is not None and attn is not None and hasattr(attn, "heads"):
                    self.value_modules[info.index] = (value, attn, info.spec.value_text_rows)

    def plan(self, num_steps: int, costs: Costs | None = None, image_rows: Any = None,
             window: tuple[int, int] | None = None, flow: bool = False) -> CachePlan:
        """The plan of a generation of ``num_steps`` calls; a budget's plan of a denoiser that runs only the steps
        ``window`` = (first, stop) of it (Wan 2.2's experts) spends the budget over those steps; ``flow``: the
        scheduler samples a flow-matching velocity (:func:`.budget.samples_flow`, which the budget rule reads)."""
        if self.config.budget is not None and self.config.plan is None:
            return self._budget_plan(num_steps, costs, image_rows, window or (0, num_steps), flow)
        if num_steps not in self.plans:
            self.plans[num_steps] = self.config.build_plan(num_steps, self.layout)
        return self.plans[num_steps]

    def _budget_plan(self, num_steps: int, costs: Costs | None, image_rows: Any, window: tuple[int, int],
                     flow: bool) -> CachePlan:
        """A budget's plan needs the model's costs, recorded at its first (full) call: until they are known
        the plan is full steps that keep the forecast history (only its first step is used)."""
        if costs is None:
            known = [plan for (steps, _, where), plan in self.plans.items() if (steps, where) == (num_steps, window)]
            if known:
                return known[-1]
            plan = full_plan(num_steps, self.layout)
            for step in plan.steps:
                step.forecast_order = self.config.forecast_order or 1
            return plan
        key = (num_steps, id(costs), window, flow)
        if key not in self.plans:
            start, stop = window
            cost = self.cost_models[key] = CostModel.from_engine(costs, self.modules, image_rows)
            plan = self.config.build_plan(stop - start, self.layout, cost, flow=flow)
            self.plans[key] = plan.placed(start, num_steps)
        return self.plans[key]

    def actions(self, step_plan: StepPlan) -> tuple[tuple[str, ...], ...]:
        """The step's action per block and module column ("compute", "partial", "reuse"), memoized.

        Compiled regions read these strings, never the fractions: steps of one kind share one set of
        guards whatever their token counts (those reach the graph only as index tensor shapes).
        """
        entry = self._actions.get(id(step_plan))
        if entry is None or entry[0] is not step_plan:
            actions = tuple(tuple("reuse" if step_plan.skips_blocks else action_of(f).value for f in row)
                            for row in step_plan.fractions)
            entry = self._actions[id(step_plan)] = (step_plan, actions)
        return entry[1]

    def forecast_weights(self, values: tuple[float, ...], device: torch.device) -> ForecastWeights:
        """``values`` with their tensor on ``device``, made once per distinct weights (a plan has few)."""
        entry = self._weights.get((values, device))
        if entry is None:
            entry = self._weights[(values, device)] = ForecastWeights.of(values, device)
        return entry

    def steps_of(self, plan: CachePlan, error_selection: bool) -> PlanSteps:
        """What a plan implies per step (history length, scored and unread full steps), once per plan."""
        entry = self._steps.get((id(plan), error_selection))
        if entry is None or entry[0] is not plan:
            entry = self._steps[(id(plan), error_selection)] = (plan, PlanSteps.of(plan, error_selection))
        return entry[1]


@dataclass(frozen=True)
class PlanSteps:
    """Per-plan facts the engine reads at every call (derived once; see :meth:`Denoiser.steps_of`)."""

    history: int  # full computations to keep per output (0 = none)
    error_order: int  # order of the forecast whose error full steps measure (forecast-error selection)
    forecasts_stack: bool  # some step forecasts the skipped stack: keep its past outputs
    output_history: int  # full calls whose prediction to keep for skipped calls (0 = none)
    scored: tuple[bool, ...]  # full steps whose token scores a later partial step reads
    unread: tuple[bool, ...]  # full steps whose outputs nothing later reads: run as stock, nothing stored

    @classmethod
    def of(cls, plan: CachePlan, error_selection: bool) -> PlanSteps:
        steps, history = plan.steps, plan.history_length
        # scored: before the next full step, some partial step selects rows from this full step's scores
        # (forecast-error selection also reads the errors measured at that full step)
        scored, needed = [], False
        for step in reversed(steps):
            scored.append(step.is_full and needed)
            if step.is_full:
                needed = False
            if any(0.0 < f < 1.0 for row in step.fractions for f in row) and not step.skips_blocks:
                needed = True
        scored.reverse()
        # unread: the next step that runs the denoiser (skipped calls read no cache) is full too, nothing
        # forecasts from stored computations, and (forecast-error selection) the next step does not measure its
        # error against what this one would store
        runs = [i for i, step in enumerate(steps) if not step.skip_call]
        next_run = dict(zip(runs, [*runs[1:], None]))
        later_cached = [not step.is_full and not step.skip_call for step in steps]
        for i in range(len(steps) - 2, -1, -1):
            later_cached[i] = later_cached[i] or later_cached[i + 1]
        last = len(steps) - 1
        unread = tuple(
            step.is_full and (next_run[i] is None or steps[next_run[i]].is_full)
            and not (history and i < last and later_cached[i + 1])
            and not (error_selection and i < last and scored[i + 1])
            for i, step in enumerate(steps))
        return cls(history, plan.max_forecast_order, plan.forecasts_stack, plan.output_history_length,
                   tuple(scored), unread)


# ------------------------------------------------------------------------------------------------
# Per-generation state (owned by one thread)
# ------------------------------------------------------------------------------------------------
@dataclass
class ModelState:
    """One denoiser's caches within one CFG branch of one generation."""

    costs: Costs | None = None
    primed: bool = False  # had a full step (a denoiser joining mid-generation starts with one)
    first_step: int = 0  # the generation's step at this denoiser's first call (> 0: an expert joining later)
    module_cache: dict[tuple[int, int, int], Any] = field(default_factory=dict)
    stack_cache: Any = None
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # per block, from the last full step
    staleness: dict[tuple[int, Any], torch.Tensor] = field(default_factory=dict)
    query: dict[int, torch.Tensor] = field(default_factory=dict)  # attention scorer only
    # forecasting: (step, output) of the last full computations, oldest first
    history: dict[tuple[int, int, int], list[tuple[int, Any]]] = field(default_factory=dict)
    stack_history: list[tuple[int, Any]] = field(default_factory=list)
    # skipped calls: (step, prediction) of the last full calls, and how to rebuild an output around a prediction
    output_history: list[tuple[int, Any]] = field(default_factory=list)
    output_template: Callable[[torch.Tensor], Any] | None = None
    # dual forecasting: per block, each partial module's per-token forecast error at the last full step
    forecast_errors: dict[int, torch.Tensor] = field(default_factory=dict)
    # re-anchoring: per module, the last partial step's (step, output) since its last full computation
    anchors: dict[tuple[int, int, int], tuple[int, Any]] = field(default_factory=dict)
    stats: CacheStats = field(default_factory=CacheStats)
    prefetched: dict[int, Any] = field(default_factory=dict)  # offloaded caches on their way back (cache_storage)

    def cache_bytes(self) -> int:
        values = [*self.module_cache.values(), self.stack_cache, *self.scores.values(), *self.staleness.values(),
                  *self.forecast_errors.values()]
        values += [v for entries in [*self.history.values(), self.stack_history, self.output_history,
                                     self.anchors.values()] for _, v in entries]
        unique = {id(t): t for value in values for t in _tensors(value)}  # history shares the newest entry
        return sum(t.numel() * t.element_size() for t in unique.values())

    def history_bytes(self) -> int:
        """The part of :meth:`cache_bytes` kept only for forecasting: stored past computations that are
        not also the current cache entry (k extra copies per output at order k)."""
        cached = {id(t) for value in [*self.module_cache.values(), self.stack_cache] for t in _tensors(value)}
        entries = [v for history in [*self.history.values(), self.stack_history, self.output_history,
                                     self.anchors.values()] for _, v in history]
        unique = {id(t): t for value in entries for t in _tensors(value) if id(t) not in cached}
        return sum(t.numel() * t.element_size() for t in unique.values())


@dataclass
class BranchState:
    """One CFG branch of a generation: its step counter and each denoiser's caches."""

    plan_steps: int
    paired: bool  # the batch holds [uncond, cond] copies of the same latents: halves share a selection
    grid: tuple[int, int, int]
    generator: torch.Generator | None  # random selection only, made at first use
    step: int = -1
    first_timestep: float | None = None
    models: dict[int, ModelState] = field(default_factory=dict)


@dataclass
class Generation:
    scheduler: Any
    epoch: int
    num_steps: int
    branches: dict[tuple, BranchState] = field(default_factory=dict)
    clock: Any = None  # branches told apart by call order: the current step (see DualCacheEngine._step_clock)
    calls_at_clock: int = 0
    unsplit: bool = False  # the step clock did not advance: calls are no longer told apart by order
    measured: bool = False  # the steps it runs were read from the scheduler (at a branch's second call)
    windows: dict[int, tuple[int, int]] = field(default_factory=dict)  # denoiser -> (first, stop) of its steps
    flow: bool = field(init=False)  # the scheduler samples a flow-matching velocity (the budget rule reads it)

    def __post_init__(self) -> None:
        self.flow = samples_flow(self.scheduler)  # once per generation, not at every call


@dataclass
class Call:
    """One denoiser call: what the block and module hooks act on."""

    denoiser: Denoiser
    branch: BranchState
    state: ModelState
    step_plan: StepPlan
    recording: bool  # full step that records token scores (a later partial step reads them)
    counting: bool  # first call for this input shape: FLOPs are being recorded
    plan: CachePlan  # the plan the step is from (the next step's is read from it too)
    history: int = 0  # full computations to keep per output (max forecast order + 1; 0 = none)
    signature: tuple = ()  # what the call's FLOPs depend on (input shape and branch): key of its Costs
    error_order: int = 0  # order of the forecast whose error full steps measure (forecast-error selection)
    stack_history: bool = False  # the plan forecasts the skipped stack: keep its past outputs
    output_history: int = 0  # full calls whose prediction to keep for skipped calls (0 = none)
    passthrough: bool = False  # a full step nothing later reads: blocks and modules run as stock, nothing stored
    offload: bool = False  # stored values are copies on another device (cache_device): load them back, prefetch
    selections: dict[tuple[int, Any], torch.Tensor] = field(default_factory=dict)
    # Decided before the denoiser runs (outside any compiled region), read by the block and module hooks:
    actions: tuple[tuple[str, ...], ...] = ()  # per block and module column (Denoiser.actions)
    picks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (block, column) -> (B, k) rows
    weights: dict[tuple[int, int, int], ForecastWeights] = field(default_factory=dict)  # forecast weights
    stack_weights: ForecastWeights | None = None
    output_weights: ForecastWeights | None = None  # a skipped call's forecast of the denoiser's output
    error_weights: dict[tuple[int, int, int], ForecastWeights] = field(default_factory=dict)  # error forecasts
    # What the hooks did, turned into statistics, caches and forecast history after the call (end_call).
    # Written to these fresh containers rather than the state's, so that a compiled model guards on
    # nothing that grows during a generation:
    events: list[tuple] = field(default_factory=list)
    outputs: dict[tuple[int, int, int], Any] = field(default_factory=dict)  # new module cache entries
    anchors: dict[tuple[int, int, int], tuple[int, Any]] = field(default_factory=dict)  # re-anchored outputs
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # token scores recorded at this step
    errors: dict[int, torch.Tensor] = field(default_factory=dict)  # forecast errors measured at this step
    queries: dict[int, torch.Tensor] = field(default_factory=dict)  # attention scorer: queries until keys come
    block: int | None = None
    block_calls: dict[int, int] = field(default_factory=dict)
    bucket: tuple = ("model",)

    def image_rows(self, grid: str) -> int:
        return _image_rows_of(self.branch, grid)


# ------------------------------------------------------------------------------------------------
class DualCacheEngine:
    """Owns the hooks on the denoisers of one pipeline and the per-thread generations they share."""

    def __init__(
        self,
        models: list[tuple[torch.nn.Module, ModelAdapter]],
        config: DualCacheConfig,
        pipeline: Any | None = None,
    ) -> None:
        self.config = config
        self.denoisers = [Denoiser(model, adapter, config) for model, adapter in models]
        self.storage = CacheStorage(config.cache_device)  # where cached features live (identity by default)
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._wrapped_contexts: list[torch.nn.Module] = []
        self.last_stats: dict[str, CacheStats] = {}
        self.fallback_selection: str | None = None
        self._stop_watch = lambda: None
        self._warned_fused = False
        self._warned_processor = False

    # ---- hooks ----------------------------------------------------------------------------------
    def attach(self) -> None:
        scheduler_watch.start()
        scheduler = getattr(self._pipeline(), "scheduler", None) if self._pipeline is not None else None
        if scheduler is not None:  # a scheduler class that is no diffusers SchedulerMixin: watched from now on
            scheduler_watch.watch_class(type(scheduler))
        # detach stops the watch; so does the engine's garbage collection when a pipeline is dropped enabled
        self._stop_watch = weakref.finalize(self, scheduler_watch.stop)
        for d_index, den in enumerate(self.denoisers):
            check_no_foreign_cache_hooks(den.model)
            _registry(den.model).register_hook(DenoiserHook(self, d_index), HOOK_DENOISER)
            self._wrap_cache_context(den.model)
            last = len(den.infos) - 1
            for info in den.infos:
                _registry(info.block).register_hook(BlockHook(self, info, info.index == last), HOOK_BLOCK)
            for module, cached in den.modules:
                sole_reader = den.sole_readers.get((cached.block, cached.column))
                _registry(module).register_hook(ModuleHook(self, cached, sole_reader), HOOK_MODULE)
            for norm, readers in den.input_norms:
                _registry(norm).register_hook(InputNormHook(self, readers), HOOK_INPUT_NORM)
            self._attach_recorders(den)

    def _attach_recorders(self, den: Denoiser) -> None:
        selection = self.selection
        for block, (value, attn, rows) in den.value_modules.items():
            if selection == "vnorm" or selection in ERROR_SELECTIONS:  # V-norm: the scores before any error
                _registry(value).register_hook(ValueRecorder(self, block, attn.heads, rows), HOOK_RECORD)
            elif selection == "attention":
                _registry(attn.to_q).register_hook(QueryRecorder(self, block, rows), HOOK_RECORD)
                _registry(attn.to_k).register_hook(KeyRecorder(self, block, attn.heads, rows), HOOK_RECORD)

    @property
    def selection(self) -> str:
        return self.fallback_selection or self.config.selection

    def detach(self) -> None:
        for den in self.denoisers:
            for module in den.model.modules():
                registry = getattr(module, "_diffusers_hook", None)
                if registry is None:
                    continue
                for name in ALL_HOOKS:
                    remove_hook(registry, name)
                if not registry.hooks:
                    del module._diffusers_hook
                    # HookRegistry leaves the original bound method as an instance attribute
                    if "forward" in vars(module) and getattr(module.forward, "__func__", None) is type(module).forward:
                        del module.forward
        for model in self._wrapped_contexts:
            vars(model).pop("cache_context", None)
        self._wrapped_contexts.clear()
        self._stop_watch()  # once only, however often detach is called
        self.reset()

    def reset(self) -> None:
        """Forget this thread's generation: the next call starts from empty caches."""
        self._local.generation = None

    def _wrap_cache_context(self, model: torch.nn.Module) -> None:
        """Record the pipeline's ``cache_context`` name per thread (diffusers keeps it on the model)."""
        original = getattr(model, "cache_context", None)
        if original is None or "cache_context" in vars(model):
            return
        local = self._local

        @contextlib.contextmanager
        def cache_context(name: str, *args: Any, **kwargs: Any):
            previous = getattr(local, "context", None)
            local.context = name
            try:
                with original(name, *args, **kwargs):
                    yield
            finally:
                local.context = previous

        model.cache_context = cache_context
        self._wrapped_contexts.append(model)

    # ---- generations ----------------------------------------------------------------------------
    def _scheduler(self) -> Any:
        """The scheduler of the pipeline calling now: the one given timesteps last in this thread (a pipeline
        sharing this transformer, e.g. made with ``from_pipe``, has its own), else the enabled pipeline's."""
        pipe = self._pipeline() if self._pipeline is not None else None
        if pipe is None:
            return None  # a bare transformer: generations are told apart by the planned number of calls
        scheduler = scheduler_watch.latest() or getattr(pipe, "scheduler", None)
        if scheduler is not None:
            scheduler_watch.watch_class(type(scheduler))  # a scheduler class that is no diffusers SchedulerMixin
        return scheduler

    def _num_steps(self, scheduler: Any) -> int:
        timesteps = getattr(scheduler, "timesteps", None) if scheduler is not None else None
        if timesteps is not None:
            return len(timesteps)
        if self.config.plan is not None:
            return self.config.plan.num_steps
        if self.config.num_inference_steps is not None:
            return self.config.num_inference_steps
        raise ValueError(
            "cannot tell the number of denoising steps: enable the cache on the pipeline (so the engine can "
            "read its scheduler), or pass num_inference_steps=... when caching a bare transformer"
        )

    def _generation(self) -> Generation:
        scheduler = self._scheduler()
        epoch = scheduler_watch.epoch(scheduler)
        gen = getattr(self._local, "generation", None)
        if gen is None or gen.scheduler is not scheduler or gen.epoch != epoch:
            gen = Generation(scheduler, epoch, self._num_steps(scheduler))
            self._local.generation = gen
        return gen

    def _measure(self, gen: Generation, timestep: Any) -> None:
        """At a branch's second call, once per generation: the steps it runs, from the scheduler's position.

        The scheduler's timesteps cover the whole schedule, but an image-to-image or video-to-video pipeline
        (``strength`` < 1) starts part-way through them, which its scheduler's ``step_index`` tells only after
        the first step (step 0 is a full step whatever the plan, so nothing is lost by learning it there); a
        scheduler without one (DDIM, CogVideoX's) is located by this call's timestep in its timesteps. Pipelines
        with two experts (``ModelAdapter.expert_switch``) also give each its own steps. At most one host read
        of a timestep per generation, never per step."""
        gen.measured = True
        scheduler = gen.scheduler
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None:
            return  # a bare transformer: its planned calls
        index = getattr(scheduler, "step_index", None)
        if not isinstance(index, int):
            value = _timestep_value(timestep, sync=True)
            values = timesteps.tolist() if isinstance(timesteps, torch.Tensor) else list(timesteps)
            index = values.index(value) if value in values else None
        if index is None or not 2 <= len(timesteps) - (index - 1) <= gen.num_steps:
            return  # not where a second call can be (another pipeline's scheduler, a rescaled timestep)
        first = index - 1  # the step the generation started at
        gen.num_steps = len(timesteps) - first
        for branch in gen.branches.values():
            branch.plan_steps = gen.num_steps
        gen.windows = self._expert_windows(scheduler, timesteps[first:])

    def _expert_windows(self, scheduler: Any, timesteps: torch.Tensor) -> dict[int, tuple[int, int]]:
        """(first, stop) of the steps each denoiser runs, where the pipeline switches between two by timestep."""
        switch = self.denoisers[0].adapter.expert_switch
        pipe = self._pipeline() if self._pipeline is not None else None
        ratio = getattr(getattr(pipe, "config", None), switch.config_key, None) if switch is not None else None
        if ratio is None:
            return {}
        boundary = ratio * scheduler.config.num_train_timesteps
        high = int((timesteps >= boundary).sum())  # the pipeline's own test: t >= boundary on the high expert
        windows = {switch.high: (0, high), switch.low: (high, len(timesteps))}
        return {i: windows[attr] for i, den in enumerate(self.denoisers)
                for attr in windows if getattr(pipe, attr, None) is den.model}

    def _branch_key(self, den: Denoiser, gen: Generation, args: tuple, kwargs: dict, batch: int) -> tuple:
        """A call's CFG branch: the pipeline's ``cache_context`` name, else the order of calls within one step
        (Flux img2img's true CFG, Wan's video-to-video and others call the denoiser once per branch without one)."""
        name = getattr(self._local, "context", None)
        clock = None if name is not None or gen.unsplit else self._step_clock(den, gen, args, kwargs)
        if clock is None:
            return name, batch
        if clock != gen.clock:
            gen.clock, gen.calls_at_clock = clock, 0
        if gen.calls_at_clock >= MAX_BRANCHES:
            # no CFG has this many branches: the clock does not advance (a loop that never steps the scheduler);
            # stop splitting rather than keep a cache per call
            logger.warning("dual cache: %d denoiser calls at one step of %s: caching them as one branch",
                           gen.calls_at_clock + 1, type(gen.scheduler).__name__)
            gen.unsplit = True
            return None, batch
        gen.calls_at_clock += 1
        return f"call{gen.calls_at_clock - 1}", batch

    @staticmethod
    def _step_clock(den: Denoiser, gen: Generation, args: tuple, kwargs: dict) -> Any:
        """What changes from one step to the next: the scheduler's step counter (a host int, no sync) where it
        keeps one, else, for families declared to need it, the call's timestep (a host read per call)."""
        if gen.scheduler is not None and hasattr(type(gen.scheduler), "step_index"):
            return "step", gen.scheduler.step_index
        if den.adapter.branches_by_timestep:
            return "timestep", _timestep_value(den.adapter.timestep(args, kwargs), sync=True)
        return None

    @torch.compiler.disable
    def begin_call(self, d_index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
        den = self.denoisers[d_index]
        latents = den.adapter.hidden_states(args, kwargs)
        gen = self._generation()
        key = self._branch_key(den, gen, args, kwargs, latents.shape[0])
        branch = gen.branches.get(key)
        timestep = _timestep_value(den.adapter.timestep(args, kwargs), sync=gen.scheduler is None)
        if branch is not None:
            self._check_alignment(branch, gen, timestep)
        if branch is None or branch.step + 1 >= branch.plan_steps:
            self._check_hooks(den)
            if branch is not None:  # a bare transformer: the planned calls are used up, a new generation starts
                gen = Generation(gen.scheduler, gen.epoch, gen.num_steps)
                self._local.generation = gen
            branch = gen.branches[key] = self._new_branch(den, gen, args, kwargs, latents)
            branch.first_timestep = timestep
        branch.step += 1
        if branch.step == 1 and not gen.measured:
            self._measure(gen, den.adapter.timestep(args, kwargs))
        state = branch.models.get(d_index)
        if state is None:
            state = branch.models[d_index] = ModelState(first_step=branch.step)
        # per branch too: a CFG branch called on its own may see another caption length (Lumina2 trims
        # its rows to the caption's true length inside the model, which no input shape tells)
        signature = (tuple(latents.shape), latents.dtype, latents.device, key)
        costs = den.costs.get(signature)
        window = gen.windows.get(d_index, (state.first_step, branch.plan_steps))
        plan = den.plan(branch.plan_steps, costs, functools.partial(_image_rows_of, branch), window, gen.flow)
        primed = state.primed
        step_plan = plan.steps[branch.step] if primed else plan.steps[0]  # nothing cached yet: full
        if step_plan.skip_blocks and state.stack_cache is None:
            # the last block never ran in this branch (SD3's skip-layer guidance can skip it): reuse every
            # module instead of skipping the stack, since there is no stack output to stand in
            step_plan = dataclasses.replace(step_plan, skip_blocks=False, kind="reuse")
        if step_plan.skip_call and (not state.output_history or costs is None):
            # no full call of this branch stored its output (a denoiser joining mid-generation): run this one
            step_plan = plan.steps[0]
        state.primed = True
        facts = den.steps_of(plan, self.selection in ERROR_SELECTIONS)
        # plan-derived flags hold for the plan's own step; a denoiser priming mid-generation records and stores
        recording = step_plan.is_full and (not primed or facts.scored[branch.step])
        passthrough = primed and costs is not None and facts.unread[branch.step]
        output_history = facts.output_history
        if costs is None and den.config.budget is not None:
            # a budget's plan is made from the costs this call records: keep its prediction in case the plan skips calls
            output_history = max(output_history, plan.max_forecast_order + 1)
        elif not output_history:
            state.output_history.clear()
        call = Call(den, branch, state, step_plan, plan=plan, recording=recording, counting=costs is None,
                    history=facts.history, error_order=facts.error_order, stack_history=facts.forecasts_stack,
                    output_history=output_history,
                    signature=signature, passthrough=passthrough, actions=den.actions(step_plan),
                    offload=self.storage.offloads_from(latents.device))
        state.costs = costs if costs is not None else Costs()
        state.stats.step_kinds.append(SKIPPED_CALL if step_plan.skip_call else step_plan.kind)
        state.stats.num_calls += 1
        if step_plan.is_full:
            state.staleness.clear()
            state.forecast_errors.clear()
        if not call.counting and not step_plan.skip_call:  # a skipped call costs nothing
            state.stats.flops += costs.model
            if not step_plan.skip_blocks:
                state.stats.flops += sum(costs.blocks.values())
        self._local.call = call
        if not step_plan.is_full:  # this step's rows and forecast weights, chosen before the denoiser runs
            self._select_rows(call, latents.shape[0], latents.device)
            if step_plan.forecast_order:
                self._forecast_weights(call, latents.device)
        elif call.recording and self.selection in ERROR_SELECTIONS:
            self._error_weights(call, latents.device)
        return call

    def _select_rows(self, call: Call, batch: int, device: torch.device) -> None:
        """Choose the rows of every partial module of this step, before the denoiser runs."""
        fractions = call.step_plan.fractions
        for _, cached in call.denoiser.modules:
            if (call.actions[cached.block][cached.column] != "partial" or not cached.spec.can_partial
                    or "image" not in cached.spec.calls):
                continue
            if (cached.block, cached.column, 0) not in call.state.module_cache:
                continue  # never computed in this branch (SD3's skip-layer guidance skips the block): no rows
            image = call.image_rows(cached.grid)
            k = num_fresh_tokens(fractions[cached.block][cached.column], image)
            if k:  # a block over part of the grid (a video's frames or pixels) sees them folded into its batch
                rows = batch * call.image_rows("all") // image
                picked = call.picks[(cached.block, cached.column)] = self._select(call, cached, k, rows, image, device)
                torch._dynamo.maybe_mark_dynamic(picked, 1)  # compiled: one graph whatever the step's token count

    def _forecast_weights(self, call: Call, device: torch.device) -> None:
        """Forecast weights of each stored history at this step (one per stored output used; floats for eager,
        a tensor for compiled models): the plan's learned weights where it has them and enough is stored,
        else Lagrange extrapolation."""
        order, step, memo, den = call.step_plan.forecast_order, call.branch.step, {}, call.denoiser
        learned = call.step_plan.forecast_weights

        def weights(history: list[tuple[int, Any]]) -> ForecastWeights | None:
            if len(history) < 2:
                return None
            if learned is not None and len(history) >= len(learned):  # learned weights (forecast_fit)
                return den.forecast_weights(learned, device)
            steps = tuple(s for s, _ in history[-(order + 1):])
            if steps not in memo:
                memo[steps] = den.forecast_weights(tuple(lagrange_weights(steps, step)), device)
            return memo[steps]

        state = call.state
        for key in state.history:
            w = weights(_anchored(state, key))
            if w is not None:
                call.weights[key] = w
        call.stack_weights = weights(state.stack_history)
        if call.step_plan.skip_call:
            call.output_weights = weights(state.output_history)

    def _error_weights(self, call: Call, device: torch.device) -> None:
        """At a full step measuring forecast errors: the Lagrange weights (order ``call.error_order``) of the
        forecast each module's output is compared with (none: compared with the cached output)."""
        if not call.error_order:
            return
        state, step, memo = call.state, call.branch.step, {}
        for key in state.history:
            history = _anchored(state, key)
            if len(history) >= 2:
                steps = tuple(s for s, _ in history[-(call.error_order + 1):])
                if steps not in memo:
                    memo[steps] = call.denoiser.forecast_weights(tuple(lagrange_weights(steps, step)), device)
                call.error_weights[key] = memo[steps]

    @torch.compiler.disable
    def end_call(self, call: Call, signature: tuple, output: Any = None) -> None:
        self._local.call = None
        den, state = call.denoiser, call.state
        if call.output_history and call.step_plan.is_full:
            prediction, state.output_template = _split_output(output)  # a copy: the pipeline owns what it got
            _remember(state.output_history, call.branch.step, prediction.clone(), call.output_history)
        if call.counting:
            den.costs[signature] = state.costs
            state.stats.flops += state.costs.per_call
        for key, output in call.outputs.items():
            state.module_cache[key] = self.storage.put(output) if call.offload else output
        state.anchors.update(call.anchors)
        state.scores.update(call.scores)
        state.forecast_errors.update(call.errors)
        self._account(call)
        state.stats.flops_uncached += state.costs.per_call
        for (_, column, _), (rows, _) in state.costs.rows.items():
            state.stats.tokens_total[den.layout.modules[column]] += rows
        state.stats.cache_bytes = max(state.stats.cache_bytes, state.cache_bytes())
        if call.history or call.output_history:
            state.stats.history_bytes = max(state.stats.history_bytes, state.history_bytes())
        if call.offload:
            self._prefetch_next_step(call, signature[2])
        gen = self._local.generation
        if gen is not None:
            self.last_stats = {
                f"{key[0]}/{key[1]}/{d}": s.stats for key, b in gen.branches.items() for d, s in b.models.items()
            }

    def _account(self, call: Call) -> None:
        """Statistics and forecast history from what the hooks did (outside any compiled region)."""
        state, costs, stats = call.state, call.state.costs, call.state.stats
        if call.passthrough:  # every module ran whole, as at the counting call
            stats.flops += sum(costs.modules.values())
            for (_, column, _), (rows, _) in costs.rows.items():
                stats.tokens_computed[call.denoiser.layout.modules[column]] += rows
        for event in call.events:
            what = event[0]
            if what == "stack":
                if call.history and call.step_plan.is_full and call.stack_history:
                    # (not re-anchored at conservative steps: forecasting the skipped stack from a conservative
                    # step's output, itself mostly forecast, lost 0.2-2 dB; docs/methods.md)
                    _remember(state.stack_history, call.branch.step, state.stack_cache, call.history)
                continue
            if what == "score":
                stats.flops += event[1]
                stats.selection_flops += event[1]
                continue
            key, cached = event[1], event[2]
            if what == "compute":
                if not call.counting:
                    stats.flops += costs.modules.get(key, 0)
                stats.tokens_computed[cached.name] += costs.rows.get(key, (0, 0))[0]
                if call.history:
                    _remember(state.history.setdefault(key, []), call.branch.step, state.module_cache[key],
                              call.history)
                    state.anchors.pop(key, None)
            elif what == "partial":
                _, _, _, batch, rows, computed, joint_text = event
                full_rows, kv_rows = costs.rows.get(key, (rows, 0))
                if joint_text is not None:
                    module = module_of(call, cached)
                    full, part = (joint_flops(module, q, rows, joint_text) for q in (full_rows, computed))
                else:
                    full, part = (cached.cost.flops(batch, q, kv_rows) for q in (full_rows, computed))
                if full:  # the measured full cost, scaled by the rows computed
                    stats.flops += round(costs.modules.get(key, 0) * part / full)
                stats.tokens_computed[cached.name] += computed

    def _new_branch(
        self, den: Denoiser, gen: Generation, args: tuple, kwargs: dict, latents: torch.Tensor
    ) -> BranchState:
        batch = latents.shape[0]
        # one host sync per generation and branch, never per step
        paired = (self.config.cfg_selection == "shared" and batch % 2 == 0
                  and bool(torch.equal(latents[: batch // 2], latents[batch // 2 :])))
        return BranchState(gen.num_steps, paired, den.adapter.token_grid(den.model, args, kwargs), generator=None)

    def _check_alignment(self, branch: BranchState, gen: Generation, timestep: float | None) -> None:
        """A bare transformer (or a transformer shared with another pipeline) must follow the plan's steps."""
        if timestep is None or branch.first_timestep is None or branch.step < 0:
            return
        restarted = timestep == branch.first_timestep and branch.step + 1 < branch.plan_steps
        overrun = branch.step + 1 >= branch.plan_steps and timestep != branch.first_timestep
        if gen.scheduler is not None and not restarted:
            return
        if restarted or overrun:
            raise RuntimeError(
                f"dual cache: the denoiser was called at timestep {timestep:g} as call {branch.step + 2} of a "
                f"generation planned for {branch.plan_steps} calls, which {'restarts' if restarted else 'overruns'} "
                "the plan: the transformer is driven with another number of steps than its cache was enabled for "
                "(or is shared with another pipeline). Enable the cache on the pipeline that calls it, pass "
                "num_inference_steps matching the calls, or call reset_dual_cache() between generations."
            )

    def _check_hooks(self, den: Denoiser) -> None:
        """Once per generation: refuse diffusers cache hooks added after enable_dual_cache."""
        for module in (den.model, *(info.block for info in den.infos)):
            registry = getattr(module, "_diffusers_hook", None)
            foreign = [n for n in (registry._hook_order if registry else ()) if n.startswith(FOREIGN_CACHE_HOOKS)]
            if foreign:
                raise RuntimeError(
                    f"dual cache: diffusers cache hooks {foreign} were added to {type(den.model).__name__} after "
                    "enable_dual_cache; two feature caches cannot share a model. Remove one of them first "
                    "(disable_dual_cache(pipe), transformer.disable_cache() or remove_baseline)."
                )

    def current_call(self) -> Call | None:
        return getattr(self._local, "call", None)

    # ---- blocks -----------------------------------------------------------------------------------
    def run_block(self, info: BlockInfo, is_last: bool, forward, args: tuple[Any, ...], kwargs: dict[str, Any]):
        call = self.current_call()
        if call is None or call.passthrough:
            return forward(*args, **kwargs)
        if call.step_plan.skip_blocks:
            if not is_last:
                return _pass_through(info.spec.outputs, args, kwargs)
            device = _hidden(args, kwargs).device
            forecast = self._forecast(call, call.stack_weights, call.state.stack_history, device)
            return self._load(call, call.state.stack_cache, device) if forecast is None else forecast
        call.block, call.block_calls, call.bucket = info.index, {}, ("block", info.index)
        if call.offload and not call.step_plan.is_full:  # the next block's caches, one block ahead
            self._prefetch_block(call, info.index + 1, _hidden(args, kwargs).device)
        try:
            output = forward(*args, **kwargs)
        finally:
            call.block, call.bucket = None, ("model",)
        if is_last:
            call.state.stack_cache = self.storage.put(output) if call.offload else output
            call.events.append(("stack",))
        return output

    # ---- cached modules ---------------------------------------------------------------------------
    def run_module(self, cached: CachedModule, forward, args: tuple[Any, ...], kwargs: dict[str, Any],
                   sole_reader: SoleReader | None = None):
        call = self.current_call()
        if call is None or call.passthrough or call.block != cached.block:
            return forward(*args, **kwargs)
        state = call.state
        index = call.block_calls.get(cached.column, 0)
        call.block_calls[cached.column] = index + 1
        key = (cached.block, cached.column, index)
        action = call.actions[cached.block][cached.column]
        if action == "compute":
            return self._compute(call, cached, key, forward, args, kwargs)
        cache = state.module_cache.get(key)
        if action == "reuse" and cache is not None and sole_reader is not None and self._unread(call, sole_reader):
            # only the reader reads this output and it will not: one row of zeros, no forecast
            return _one_row_of_zeros(cache, _hidden(args, kwargs).device)
        partial = action == "partial" and cached.spec.can_partial and cached.call_kind(index) == "image"
        if cache is None or (action == "partial" and not partial):
            return self._compute(call, cached, key, forward, args, kwargs)
        device = _hidden(args, kwargs).device
        forecast = self._forecast(call, call.weights.get(key), _anchored(state, key), device)
        if forecast is None:
            cache = self._load(call, cache, device)
        if not partial:
            return cache if forecast is None else forecast
        return self._recompute_rows(call, cached, key, cache, forward, args, kwargs, forecast)

    def run_input_norm(self, readers: tuple[CachedModule, ...], forward, args: tuple[Any, ...],
                       kwargs: dict[str, Any]):
        """A norm whose output only the cached modules ``readers`` read: where none of their next calls computes
        (each output forecast or reused whole, as :meth:`run_module` decides), one row of the norm's input, a view,
        so that the norm and the block's modulation of its rows cost one row; otherwise the norm."""
        call = self.current_call()
        if (call is None or call.passthrough or call.block != readers[0].block
                or not all(self._computes_nothing(call, cached) for cached in readers)):
            return forward(*args, **kwargs)
        return _hidden(args, kwargs)[:, :1]

    def _unread(self, call: Call, sole_reader: SoleReader) -> bool:
        """Whether the outputs of ``sole_reader.inputs`` go unread at this call: the reader computes nothing, and
        none of them computes (where one did, as a learned plan may choose, the others' outputs must meet its full
        rows, so every one returns its real output). The inputs are called once per block, some already this time:
        their call is the first."""
        return self._computes_nothing(call, sole_reader.reader) and all(
            self._computes_nothing(call, cached, index=0) for cached in sole_reader.inputs)

    @staticmethod
    def _computes_nothing(call: Call, cached: CachedModule, index: int | None = None) -> bool:
        """Whether call ``index`` (default: the next) of ``cached`` in the current block returns a stored output
        forecast or reused whole (the test :meth:`run_module` applies), so that nothing read only by it needs
        computing."""
        index = call.block_calls.get(cached.column, 0) if index is None else index
        return (call.actions[cached.block][cached.column] == "reuse"
                and (cached.block, cached.column, index) in call.state.module_cache)

    def _forecast(self, call: Call, weights: ForecastWeights | None, history, device: torch.device) -> Any:
        """The step's forecast output from the weights chosen in begin_call (the plan's learned weights or
        Lagrange extrapolation), or None where the step reuses as is (or too little is stored)."""
        if weights is None:
            return None
        return combine([self._load(call, v, device) for _, v in history[-weights.count:]], weights)

    def forecast_call(self, call: Call) -> Any:
        """A skipped call's output: the forecast of the denoiser's prediction (the last full call's, copied, at
        order 0 or while one is stored) in the layout of the last full call's output."""
        state, weights = call.state, call.output_weights
        if weights is not None:  # kept on the model's device, never offloaded (one prediction per full call)
            prediction = combine([v for _, v in state.output_history[-weights.count:]], weights)
        else:  # a copy, as the stored one must stay as it was
            prediction = state.output_history[-1][1].clone()
        return state.output_template(prediction)

    # ---- cache storage (cache_device) ---------------------------------------------------------------
    def _load(self, call: Call, stored: Any, device: torch.device) -> Any:
        """A stored value on the model's device. Without offloading (``call.offload`` False, decided in
        begin_call) the stored value itself, with no bookkeeping for a compiled block to guard on."""
        return self.storage.get(call.state.prefetched, stored, device) if call.offload else stored

    def _stored_needs(self, state: ModelState, step_plan: StepPlan, block: int | None) -> list[Any]:
        """The stored values a step reads in ``block`` (None: the skipped block stack)."""
        order = step_plan.forecast_order
        if block is None:
            if len(state.stack_history) >= 2 and order:
                return [v for _, v in state.stack_history[-(order + 1):]]
            return [state.stack_cache]
        needs = []
        for key, stored in state.module_cache.items():
            if key[0] != block or step_plan.fractions[block][key[1]] >= 1.0:
                continue
            history = state.history.get(key, ())
            needs += [v for _, v in history[-(order + 1):]] if order and len(history) >= 2 else [stored]
        return needs

    def _prefetch_block(self, call: Call, block: int, device: torch.device) -> None:
        if block < len(call.step_plan.fractions):
            for stored in self._stored_needs(call.state, call.step_plan, block):
                self.storage.prefetch(call.state.prefetched, stored, device)

    def _prefetch_next_step(self, call: Call, device: torch.device) -> None:
        """At the end of a call: start bringing back what the branch's next step reads first."""
        state = call.state
        state.prefetched.clear()  # copies this step did not use (its plan changed its mind)
        plan = call.plan
        step = call.branch.step + 1
        if step >= plan.num_steps:
            return
        step_plan = plan.steps[step]
        if step_plan.is_full or step_plan.skip_call:
            return
        if step_plan.skip_blocks:
            for stored in self._stored_needs(state, step_plan, None):
                self.storage.prefetch(state.prefetched, stored, device)
        else:
            self._prefetch_block(dataclasses.replace(call, step_plan=step_plan), 0, device)

    def _record_forecast_error(self, call: Call, cached: CachedModule, key: tuple, output: Any) -> None:
        """At a full step: how far the forecast (order ``call.error_order``; reuse at order 0) of this
        module's output was from the computed one, per image token, added to the block's error score."""
        device = output.device if isinstance(output, torch.Tensor) else None
        weights = call.error_weights.get(key)  # chosen in begin_call
        if weights is not None:
            predicted = self._forecast(call, weights, _anchored(call.state, key), device)
        else:
            predicted = self._load(call, call.state.module_cache.get(key), device)
        if not isinstance(predicted, torch.Tensor) or not isinstance(output, torch.Tensor):
            return
        image = call.image_rows(cached.grid)
        error = forecast_error(_image_rows(predicted, image, cached.spec.text_rows),
                               _image_rows(output, image, cached.spec.text_rows),
                               call.branch.paired and output.shape[0] % 2 == 0)
        errors = call.errors  # merged into the state's after the call
        previous = errors.get(cached.block)
        if previous is None:
            errors[cached.block] = error
        elif previous.shape == error.shape:
            errors[cached.block] = previous + error

    def _compute(self, call: Call, cached: CachedModule, key: tuple, forward, args: tuple, kwargs: dict):
        state = call.state
        if call.counting:
            call.bucket = ("module", key)
            try:
                output = forward(*args, **kwargs)
            finally:
                call.bucket = ("block", cached.block)
            hidden = _hidden(args, kwargs)
            state.costs.rows[key] = (hidden.shape[1], _kv_rows(hidden, args, kwargs))
        else:
            output = forward(*args, **kwargs)
        if (call.recording and self.selection in ERROR_SELECTIONS and cached.spec.can_partial
                and cached.call_kind(key[2]) == "image"):
            self._record_forecast_error(call, cached, key, output)
        call.outputs[key] = output  # stored (and remembered for forecasts) in end_call
        call.events.append(("compute", key, cached))
        return output

    def _recompute_rows(self, call: Call, cached: CachedModule, key: tuple, cache: torch.Tensor,
                        forward, args: tuple, kwargs: dict, forecast: torch.Tensor | None = None):
        """Recompute the selected rows (chosen in begin_call) and write them into the cache (or, when
        forecasting, into this step's forecast, leaving the stored full computations as they are)."""
        state = call.state
        hidden = _hidden(args, kwargs)
        batch, rows = hidden.shape[0], hidden.shape[1]
        image = call.image_rows(cached.grid)
        text = rows - image
        if text < 0 or (text > 0 and cached.spec.text_rows == "none"):
            raise RuntimeError(
                f"dual cache: {cached.name} of block {cached.block} sees {rows} rows but the token grid "
                f"{call.branch.grid} ({cached.grid}) has {image} image tokens; the adapter's layout is wrong"
            )
        if forecast is not None:
            cache = forecast
        elif call.history and _same_value(cache, state.module_cache[key]):
            # the cached tensor is also the newest stored full computation: keep that intact
            cache = call.outputs[key] = _clone(cache)
        picked = call.picks.get((cached.block, cached.column))  # (batch, k) image rows, chosen in begin_call
        if picked is None:  # no row to recompute at this step
            return cache
        if text:
            text_index = torch.arange(text, device=hidden.device).expand(batch, text)
            if cached.spec.text_rows == "first":
                picked = torch.cat([text_index, picked + text], dim=1)
            else:
                picked = torch.cat([picked, text_index + image], dim=1)
        fresh = self._partial_forward(call, cached, forward, hidden, picked, args, kwargs)
        joint = isinstance(cache, tuple)  # joint attention's (image, text): image rows scattered, text all fresh
        rows_cache, rows_fresh = (cache[0], fresh[0]) if joint else (cache, fresh)
        # rows of the flattened (batch * rows) matrix: one index_copy_ instead of expand + scatter
        flat = _flat_rows(picked, rows_cache.shape[1])
        rows_fresh = rows_fresh.to(rows_cache.dtype).reshape(flat.shape[0], -1)
        if torch.is_grad_enabled():  # keep autograd's saved tensors intact
            rows_cache = rows_cache.reshape(-1, rows_fresh.shape[1]).index_copy(0, flat, rows_fresh).view(
                rows_cache.shape)
        else:
            if not rows_cache.is_contiguous():
                rows_cache = rows_cache.contiguous()
            rows_cache.view(-1, rows_fresh.shape[1]).index_copy_(0, flat, rows_fresh)
        cache = (rows_cache, *(f.to(c.dtype) for f, c in zip(fresh[1:], cache[1:]))) if joint else rows_cache
        if forecast is None and not _same_value(cache, state.module_cache[key]):  # new, or a copy of an offloaded one
            call.outputs[key] = cache
        if call.history and self.config.forecast_reanchor:
            # re-anchor: until the next full computation, this step's output is the newest point forecasts
            # start from, so the recomputed rows steer them while the other rows (forecast values, on the
            # polynomial being followed) continue unchanged
            call.anchors[key] = (call.branch.step, cache)
        joint_text = fresh[1].shape[1] if joint else None
        call.events.append(("partial", key, cached, batch, rows, picked.shape[1], joint_text))
        return cache

    def _partial_forward(self, call: Call, cached: CachedModule, forward, hidden: torch.Tensor, picked: torch.Tensor,
                         args: tuple, kwargs: dict) -> torch.Tensor:
        """The module's output at rows ``picked`` (selected queries against all keys / values for self-attention)."""
        rotary = cached.spec.rotary
        if rotary is not None:
            attn = module_of(call, cached)
            if rotary.supports(attn, args, kwargs):
                return rotary_partial_attention(attn, rotary, hidden, picked, args, kwargs)
            if not self._warned_processor:
                self._warned_processor = True
                logger.warning("dual cache: %s of block %d has processor %s, which partial self-attention does not "
                               "reproduce; it is computed whole at partial steps (the FLOPs count assumes partial)",
                               cached.name, cached.block, type(getattr(attn, "processor", None)).__name__)
            output = forward(*args, **kwargs)
            if isinstance(output, tuple):  # joint attention: (image rows picked, every text row)
                return (_gather_rows(output[0], picked), *output[1:])
            return _gather_rows(output, picked)
        gathered = _gather_rows(hidden, picked)
        rest, kwargs = (args[1:], dict(kwargs)) if args else ((), dict(kwargs))
        kwargs.pop("hidden_states", None)
        if cached.spec.role == "self_attention":
            kwargs["encoder_hidden_states"] = hidden  # selected queries against all keys / values
        return forward(gathered, *rest, **kwargs)

    def _select(self, call: Call, cached: CachedModule, k: int, batch: int, tokens: int, device) -> torch.Tensor:
        group_key = (cached.block, cached.spec.group or cached.column)
        chosen = call.selections.get(group_key)
        if chosen is not None and chosen.shape[1] == k:
            return chosen
        paired = call.branch.paired and batch % 2 == 0
        groups = batch // 2 if paired else batch
        state = call.state
        base = None if self.selection == "random" else state.scores.get(cached.block)
        errors = state.forecast_errors.get(cached.block) if self.selection in ERROR_SELECTIONS else None
        if errors is not None and errors.shape == (groups, tokens):
            errors = normalize_score(errors)
            base = errors if self.selection == "forecast_error" or base is None else base + errors
        if base is None and (self.selection in ("random", *ERROR_SELECTIONS) or self._fused(call, cached.block)):
            base = self._random_scores(call, groups, tokens, device)
        elif base is None or base.shape != (groups, tokens):
            raise RuntimeError(
                f"dual cache: block {cached.block} has no token scores for {groups}x{tokens} tokens; the step "
                "before a partial step must be full (scores are recorded there)"
            )
        staleness = state.staleness.get(group_key)
        if staleness is None:
            staleness = state.staleness[group_key] = torch.zeros((groups, tokens), device=device)
        frames, rows, cols = call.branch.grid
        grid = (rows, cols) if cached.grid == "space" or (cached.grid == "all" and frames == 1) else None
        if cached.grid == "all" and frames > 1:
            grid = (frames * rows, cols)  # frames stacked: cells never straddle two frames when rows % cell == 0
        index = select_tokens(base, k, staleness, self.config.staleness_weight, self.config.interval, grid,
                              self.config.spatial_grid, self.config.spatial_bonus)
        staleness.add_(1.0).scatter_(1, index, 0.0)
        chosen = torch.cat([index, index]) if paired else index
        call.selections[group_key] = chosen
        return chosen

    def _random_scores(self, call: Call, groups: int, tokens: int, device) -> torch.Tensor:
        if call.branch.generator is None:
            call.branch.generator = torch.Generator(device=device)
            call.branch.generator.manual_seed(self.config.seed)
        return random_base(groups, tokens, call.branch.generator, device)

    def _fused(self, call: Call, block: int) -> bool:
        """QKV projections fused after enabling (``pipe.fuse_qkv_projections()``): no value norms to read."""
        entry = call.denoiser.value_modules.get(block)
        if entry is None or not getattr(entry[1], "fused_projections", False):
            return False
        if not self._warned_fused:
            self._warned_fused = True
            logger.warning("dual cache: QKV projections are fused, so %s selection has no value norms to read; "
                           "selecting tokens at random (pipe.unfuse_qkv_projections() restores it)", self.selection)
        return True

    # ---- score recording at full steps ------------------------------------------------------------
    def _recording_call(self, block: int) -> Call | None:
        call = self.current_call()
        if call is None or not call.recording or call.block != block:
            return None
        return call

    def record_value(self, block: int, value: torch.Tensor, heads: int, text_rows: str) -> None:
        call = self._recording_call(block)
        if call is not None:
            value = _image_rows(value, call.image_rows(call.denoiser.infos[block].spec.grid), text_rows)
            call.scores[block] = vnorm_score(value, heads, call.branch.paired and value.shape[0] % 2 == 0)

    def record_query(self, block: int, query: torch.Tensor, text_rows: str) -> None:
        call = self._recording_call(block)
        if call is not None:
            call.queries[block] = _image_rows(query, call.image_rows(call.denoiser.infos[block].spec.grid),
                                              text_rows)

    def record_key(self, block: int, key: torch.Tensor, heads: int, text_rows: str) -> None:
        call = self._recording_call(block)
        if call is None or block not in call.queries:
            return
        query = call.queries.pop(block)
        key = _image_rows(key, call.image_rows(call.denoiser.infos[block].spec.grid), text_rows)
        call.scores[block] = attention_score(query, key, heads, call.branch.paired and key.shape[0] % 2 == 0)
        call.events.append(("score", attention_score_flops(query.shape[0], query.shape[1], query.shape[2])))

    # ---- FLOPs of the counting call -----------------------------------------------------------------
    def add_counted_flops(self, flops: int) -> None:
        call = self.current_call()
        if call is None or not call.counting:
            return
        costs, bucket = call.state.costs, call.bucket
        if bucket[0] == "module":
            costs.modules[bucket[1]] += flops
        elif bucket[0] == "block":
            costs.blocks[bucket[1]] += flops
        else:
            costs.model += flops

    def stats(self) -> CacheStats:
        parts = list(self.last_stats.values()) or [CacheStats()]
        stats = dataclasses.replace(CacheStats.merge(parts)) if len(parts) == 1 else CacheStats.merge(parts)
        stats.weight_bytes = weight_bytes([den.model for den in self.denoisers])
        stats.cache_device = self.config.cache_device
        return stats


# ------------------------------------------------------------------------------------------------
# Hooks
# ------------------------------------------------------------------------------------------------
class _FlopRecorder(TorchDispatchMode):
    """Counts FLOPs with FlopCounterMode's formulas and hands them to the engine (thread-local)."""

    def __init__(self, engine: DualCacheEngine) -> None:
        super().__init__()
        self.engine = engine
        self.formulas = flop_formulas()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        formula = self.formulas.get(func._overloadpacket)
        if formula is None and func is not torch.ops.prim.device.default:
            # as FlopCounterMode does: composite ops (aten.linear under inference_mode) are decomposed
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if formula is not None:
            self.engine.add_counted_flops(formula(*args, **kwargs, out_val=out))
        return out


class DenoiserHook(ModelHook):
    """Opens a Call around every denoiser call (and counts FLOPs at the first call per input shape)."""

    def __init__(self, engine: DualCacheEngine, d_index: int) -> None:
        super().__init__()
        self.engine, self.d_index = engine, d_index

    @functools.partial(torch.compiler.disable, recursive=False)
    def new_forward(self, module, *args, **kwargs):
        # Never traced (recursive=False): under torch.compile the engine's per-step decisions run here, in
        # Python, and the model's own forward below is compiled as its own frame, hooks of blocks and modules
        # included; those read only the step's actions, the chosen rows and tensors (see Call).
        try:
            call = self.engine.begin_call(self.d_index, args, kwargs)
            if call.step_plan.skip_call:
                output = self.engine.forecast_call(call)
            elif call.counting:  # the FLOPs recorder is a dispatch mode: this one call runs eagerly
                with _FlopRecorder(self.engine):
                    output = torch.compiler.disable(self.fn_ref.original_forward)(*args, **kwargs)
            else:
                output = self.fn_ref.original_forward(*args, **kwargs)
        except BaseException:
            self.engine._local.call = None
            self.engine.reset()  # an interrupted generation leaves nothing half-done behind
            raise
        self.engine.end_call(call, call.signature, output)
        return output


class BlockHook(ModelHook):
    def __init__(self, engine: DualCacheEngine, info: BlockInfo, is_last: bool) -> None:
        super().__init__()
        self.engine, self.info, self.is_last = engine, info, is_last

    def new_forward(self, module, *args, **kwargs):
        return self.engine.run_block(self.info, self.is_last, self.fn_ref.original_forward, args, kwargs)


class ModuleHook(ModelHook):
    def __init__(self, engine: DualCacheEngine, cached: CachedModule, sole_reader: SoleReader | None = None) -> None:
        super().__init__()
        self.engine, self.cached, self.sole_reader = engine, cached, sole_reader

    def new_forward(self, module, *args, **kwargs):
        return self.engine.run_module(self.cached, self.fn_ref.original_forward, args, kwargs, self.sole_reader)


class InputNormHook(ModelHook):
    def __init__(self, engine: DualCacheEngine, readers: tuple[CachedModule, ...]) -> None:
        super().__init__()
        self.engine, self.readers = engine, readers

    def new_forward(self, module, *args, **kwargs):
        return self.engine.run_input_norm(self.readers, self.fn_ref.original_forward, args, kwargs)


class ValueRecorder(ModelHook):
    """Records value-vector norms of a block's self-attention at full steps (V-caching)."""

    def __init__(self, engine: DualCacheEngine, block: int, heads: int, text_rows: str) -> None:
        super().__init__()
        self.engine, self.block, self.heads, self.text_rows = engine, block, heads, text_rows

    def post_forward(self, module, output):
        self.engine.record_value(self.block, output, self.heads, self.text_rows)
        return output


class QueryRecorder(ModelHook):
    def __init__(self, engine: DualCacheEngine, block: int, text_rows: str) -> None:
        super().__init__()
        self.engine, self.block, self.text_rows = engine, block, text_rows

    def post_forward(self, module, output):
        self.engine.record_query(self.block, output, self.text_rows)
        return output


class KeyRecorder(ModelHook):
    def __init__(self, engine: DualCacheEngine, block: int, heads: int, text_rows: str) -> None:
        super().__init__()
        self.engine, self.block, self.heads, self.text_rows = engine, block, heads, text_rows

    def post_forward(self, module, output):
        self.engine.record_key(self.block, output, self.heads, self.text_rows)
        return output


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def _registry(module: torch.nn.Module) -> HookRegistry:
    return HookRegistry.check_if_exists_or_initialize(module)


def remove_hook(registry: HookRegistry, name: str) -> None:
    """``registry.remove_hook(name)`` that keeps hooks registered after it working.

    diffusers' own removal hands the removed hook's inner forward to the next hook's ``forward``
    slot; for a hook with ``new_forward`` that replaces the hook itself and leaves its
    ``original_forward`` pointing at the removed hook, which then keeps running.
    """
    if name not in registry.hooks:
        return
    index = registry._hook_order.index(name)
    removed = registry._fn_refs[index]
    inner = removed.original_forward if removed.original_forward is not None else removed.forward
    successor = registry._fn_refs[index + 1] if index + 1 < len(registry._fn_refs) else None
    successor_forward = successor.forward if successor is not None else None
    registry.remove_hook(name, recurse=False)
    if successor is not None and successor.original_forward is not None:
        successor.forward = successor_forward
        successor.original_forward = inner


def check_no_foreign_cache_hooks(model: torch.nn.Module) -> None:
    """Refuse a model that carries one of diffusers' own caches (they would fight over the blocks)."""
    for name, module in model.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        foreign = [hook for hook in registry._hook_order if hook.startswith(FOREIGN_CACHE_HOOKS)]
        if foreign:
            where = name or type(model).__name__
            raise ValueError(
                f"{type(model).__name__} already has diffusers cache hooks {foreign} (on {where}); dual caching "
                "cannot be combined with another feature cache. Remove it first (transformer.disable_cache() or "
                "remove_baseline) and enable dual caching again."
            )


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _encoder(args: tuple, kwargs: dict) -> Any:
    """``encoder_hidden_states`` of a block or attention call, by keyword or as the second positional argument
    (diffusers' signatures; Wan calls ``attn2(x, context, None, None)``)."""
    return args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")


def _kv_rows(hidden: torch.Tensor, args: tuple, kwargs: dict) -> int:
    """The key/value rows of an attention call: ``encoder_hidden_states``'s, else the query rows."""
    encoder = _encoder(args, kwargs)
    return encoder.shape[1] if isinstance(encoder, torch.Tensor) else hidden.shape[1]


def module_of(call: Call, cached: CachedModule) -> torch.nn.Module:
    return getattr(call.denoiser.infos[cached.block].block, cached.name)


def _one_row_of_zeros(value: Any, device: torch.device) -> Any:
    """Zeros shaped like the first row of ``value`` (a stored output: a tensor or a tuple of them / None), on
    ``device``: what a module whose output nothing will read returns."""
    if isinstance(value, torch.Tensor):
        return torch.zeros((value.shape[0], 1, *value.shape[2:]), dtype=value.dtype, device=device)
    if isinstance(value, (tuple, list)):
        return type(value)(_one_row_of_zeros(v, device) for v in value)
    return value


def _clone(value: Any) -> Any:
    return tuple(_clone(v) for v in value) if isinstance(value, tuple) else value.clone()


def _same_value(a: Any, b: Any) -> bool:
    """Whether ``a`` is the stored value ``b`` (the same tensors, element by element for a joint module's tuple).

    Not ``a is b``: dynamo cannot trace identity between two tuples (a graph break at every joint module of a
    partial step), while identity between tensors, and the recursion, trace to constants.
    """
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return a is b


def _flat_rows(picked: torch.Tensor, rows: int) -> torch.Tensor:
    """Rows ``picked`` (batch, k) of a (batch, rows, ...) tensor as indices into its (batch * rows) matrix."""
    return (picked + torch.arange(picked.shape[0], device=picked.device).unsqueeze(1) * rows).reshape(-1)


def _gather_rows(tensor: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """``tensor[b, picked[b]]`` for each batch row b: one index_select of the flattened rows."""
    batch, rows = tensor.shape[:2]
    flat = _flat_rows(picked, rows)
    return tensor.reshape(batch * rows, -1).index_select(0, flat).view(batch, picked.shape[1], *tensor.shape[2:])


def _image_rows(tensor: torch.Tensor, image: int, text_rows: str) -> torch.Tensor:
    if text_rows == "first":
        return tensor[:, tensor.shape[1] - image :]
    if text_rows == "last":
        return tensor[:, :image]
    return tensor


def _pass_through(outputs: str, args: tuple, kwargs: dict) -> Any:
    hidden = _hidden(args, kwargs)
    if outputs == "h":
        return hidden
    encoder = _encoder(args, kwargs)
    return (hidden, encoder) if outputs == "h,e" else (encoder, hidden)


def _timestep_value(timestep: Any, sync: bool) -> float | None:
    """The call's timestep as a float, read only where that costs no host sync (or ``sync`` allows it)."""
    if timestep is None:
        return None
    if isinstance(timestep, (int, float)):
        return float(timestep)
    if (isinstance(timestep, torch.Tensor) and timestep.numel() and timestep.device.type != "meta"
            and (sync or timestep.device.type == "cpu")):
        return float(timestep.detach().reshape(-1)[0])
    return None


def _image_rows_of(branch: BranchState, grid: str) -> int:
    frames, rows, cols = branch.grid
    return {"all": frames * rows * cols, "space": rows * cols, "time": frames}[grid]


def _anchored(state: ModelState, key: tuple) -> Any:
    """The points a forecast of module ``key`` starts from: its stored full computations, then its
    re-anchored partial output if one came after them."""
    history = state.history.get(key, ())
    anchor = state.anchors.get(key)
    return history if anchor is None else [*history, anchor]


def _split_output(output: Any) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """A denoiser's output as its prediction (the first value: every diffusers transformer returns it first)
    and a function that puts another prediction in its place, the other values kept."""
    if isinstance(output, torch.Tensor):
        return output, lambda prediction: prediction
    if isinstance(output, BaseOutput):  # the rebuild keeps the other values, not the prediction
        first, *_ = output.keys()
        kind, rest = type(output), {key: value for key, value in output.items() if key != first}
        return output[first], lambda prediction: kind(**{first: prediction, **rest})
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        kind, rest = type(output), tuple(output[1:])
        return output[0], lambda prediction: kind((prediction, *rest))
    raise TypeError(f"dual cache: cannot skip calls of a denoiser whose output is a {type(output).__name__} "
                    "(expected a tensor, a tuple starting with one or a diffusers output class)")


def _remember(history: list[tuple[int, Any]], step: int, value: Any, keep: int) -> None:
    history.append((step, value))
    del history[:-keep]


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []
