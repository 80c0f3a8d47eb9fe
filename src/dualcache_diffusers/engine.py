"""The caching engine: diffusers ``ModelHook``s on the denoisers, their blocks and cached modules.

One engine serves one pipeline (or one bare transformer) and every denoiser in it (Wan 2.2 A14B has
two). What it needs to know about a model comes from the model's adapter, as data.

State. Everything one generation keeps (step, caches, token scores, statistics) lives in a
:class:`Generation` owned by the calling thread, so one pipeline can serve several threads at once.
A generation starts when the pipeline's *current* scheduler is given new timesteps in this thread
(``set_timesteps`` is instrumented), when the pipeline's scheduler is replaced, or, for a bare
transformer, when the planned number of calls is used up. Within a generation, each CFG branch (the
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
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch.utils._python_dispatch import TorchDispatchMode

from .adapters import ModelAdapter
from .adapters.base import BlockInfo, ModuleSpec, resolve
from .config import DualCacheConfig
from .forecast import combine, lagrange_weights
from .plan import CachePlan, PlanLayout, StepPlan, action_of, num_fresh_tokens
from .selection import attention_score, attention_score_flops, random_base, select_tokens, vnorm_score
from .stats import CacheStats, ModuleCost, flop_formulas

logger = logging.getLogger(__name__)

HOOK_DENOISER = "dualcache_denoiser"
HOOK_BLOCK = "dualcache_block"
HOOK_MODULE = "dualcache_module"
HOOK_RECORD = "dualcache_record"
ALL_HOOKS = (HOOK_DENOISER, HOOK_BLOCK, HOOK_MODULE, HOOK_RECORD)
#: name prefixes of diffusers' own cache hooks, which cannot share a model with this engine
FOREIGN_CACHE_HOOKS = ("fbc_", "faster_cache", "mag_cache", "pyramid_attention_broadcast", "sea_cache",
                       "taylorseer_cache", "text_kv_cache")

# set_timesteps calls per scheduler, counted per thread (see Generation)
_EPOCHS = threading.local()


def _epoch(scheduler: Any) -> int:
    return getattr(_EPOCHS, "counts", {}).get(id(scheduler), 0)


def _bump_epoch(scheduler: Any) -> None:
    counts = getattr(_EPOCHS, "counts", None)
    if counts is None:
        counts = _EPOCHS.counts = {}
    counts[id(scheduler)] = counts.get(id(scheduler), 0) + 1


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
                          ModuleCost.of(getattr(info.block, spec.name))))
            for info in self.infos
            for spec in info.modules
        ]
        self.plans: dict[int, CachePlan] = {}
        self.costs: dict[tuple, Costs] = {}
        self._actions: dict[int, tuple[StepPlan, tuple[tuple[str, ...], ...]]] = {}
        self._history: dict[int, tuple[CachePlan, int]] = {}
        self._unread: dict[int, tuple[bool, ...]] = {}
        self._scored: dict[int, tuple[bool, ...]] = {}  # per plan (by step count): full steps that record scores
        self.value_modules: dict[int, tuple[torch.nn.Module, torch.nn.Module, str]] = {}  # block -> (to_v, attn, rows)
        for info in self.infos:
            if info.spec.value:
                value = resolve(info.block, info.spec.value)
                attn = resolve(info.block, info.spec.value.rsplit(".", 1)[0]) if "." in info.spec.value else None
                if value is not None and attn is not None and hasattr(attn, "heads"):
                    self.value_modules[info.index] = (value, attn, info.spec.value_text_rows)

    def plan(self, num_steps: int) -> CachePlan:
        if num_steps not in self.plans:
            self.plans[num_steps] = self.config.build_plan(num_steps, self.layout)
        return self.plans[num_steps]

    def history_length(self, plan: CachePlan) -> int:
        """Full computations to keep per output (max forecast order + 1; 0 = none), once per plan."""
        entry = self._history.get(id(plan))
        if entry is None or entry[0] is not plan:
            order = plan.max_forecast_order
            entry = self._history[id(plan)] = (plan, order + 1 if order else 0)
        return entry[1]

    def actions(self, step_plan: StepPlan) -> tuple[tuple[str, ...], ...]:
        """The step's action per block and module column ("compute", "partial", "reuse"), memoized.

        Compiled regions read these strings, never the fractions: steps of one kind share one set of
        guards whatever their token counts (those reach the graph only as index tensor shapes).
        """
        entry = self._actions.get(id(step_plan))
        if entry is None or entry[0] is not step_plan:
            actions = tuple(tuple("reuse" if step_plan.skip_blocks else action_of(f).value for f in row)
                            for row in step_plan.fractions)
            entry = self._actions[id(step_plan)] = (step_plan, actions)
        return entry[1]

    def scored_steps(self, num_steps: int) -> tuple[bool, ...]:
        """Per step: a full step whose token scores a later partial step reads (before the next full step).

        Only these steps record scores, so FORA, interval=1 and other plans without partial steps
        never pay for them.
        """
        if num_steps not in self._scored:
            steps, needed, out = self.plan(num_steps).steps, False, []
            for step in reversed(steps):
                out.append(step.is_full and needed)
                if step.is_full:
                    needed = False
                if any(0.0 < f < 1.0 for row in step.fractions for f in row) and not step.skip_blocks:
                    needed = True
            self._scored[num_steps] = tuple(reversed(out))
        return self._scored[num_steps]

    def unread_steps(self, num_steps: int) -> tuple[bool, ...]:
        """Per step: a full step whose outputs no later step reads (the next step is full too, and nothing
        forecasts from stored computations). These run the stock forward with nothing stored, so interval=1
        costs what stock does."""
        if num_steps not in self._unread:
            plan = self.plan(num_steps)
            steps, forecasting = plan.steps, self.history_length(plan) > 0
            later_cached = [not step.is_full for step in steps]
            for i in range(len(steps) - 2, -1, -1):
                later_cached[i] = later_cached[i] or later_cached[i + 1]
            self._unread[num_steps] = tuple(
                step.is_full and (i + 1 == len(steps) or steps[i + 1].is_full)
                and not (forecasting and i + 1 < len(steps) and later_cached[i + 1])
                for i, step in enumerate(steps))
        return self._unread[num_steps]


# ------------------------------------------------------------------------------------------------
# Per-generation state (owned by one thread)
# ------------------------------------------------------------------------------------------------
@dataclass
class ModelState:
    """One denoiser's caches within one CFG branch of one generation."""

    costs: Costs | None = None
    primed: bool = False  # had a full step (a denoiser joining mid-generation starts with one)
    module_cache: dict[tuple[int, int, int], Any] = field(default_factory=dict)
    stack_cache: Any = None
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # per block, from the last full step
    staleness: dict[tuple[int, Any], torch.Tensor] = field(default_factory=dict)
    query: dict[int, torch.Tensor] = field(default_factory=dict)  # attention scorer only
    # forecasting: (step, output) of the last full computations, oldest first
    history: dict[tuple[int, int, int], list[tuple[int, Any]]] = field(default_factory=dict)
    stack_history: list[tuple[int, Any]] = field(default_factory=list)
    stats: CacheStats = field(default_factory=CacheStats)

    def cache_bytes(self) -> int:
        values = [*self.module_cache.values(), self.stack_cache, *self.scores.values(), *self.staleness.values()]
        values += [v for entries in [*self.history.values(), self.stack_history] for _, v in entries]
        unique = {id(t): t for value in values for t in _tensors(value)}  # history shares the newest entry
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
    timestep: float | None = None  # branches told apart by call order: the current timestep
    calls_at_timestep: int = 0


@dataclass
class Call:
    """One denoiser call: what the block and module hooks act on."""

    denoiser: Denoiser
    branch: BranchState
    state: ModelState
    step_plan: StepPlan
    recording: bool  # full step that records token scores (a later partial step reads them)
    counting: bool  # first call for this input shape: FLOPs are being recorded
    history: int = 0  # full computations to keep per output (max forecast order + 1; 0 = none)
    signature: tuple = ()  # (shape, dtype, device) of the latents: the key of the recorded costs
    passthrough: bool = False  # a full step nothing later reads: blocks and modules run as stock, nothing stored
    selections: dict[tuple[int, Any], torch.Tensor] = field(default_factory=dict)
    # Decided before the denoiser runs (outside any compiled region), read by the block and module hooks:
    actions: tuple[tuple[str, ...], ...] = ()  # per block and module column (Denoiser.actions)
    picks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (block, column) -> (B, k) rows
    weights: dict[tuple[int, int, int], tuple[float, ...]] = field(default_factory=dict)  # forecast weights
    stack_weights: tuple[float, ...] | None = None
    # What the hooks did, turned into statistics, caches and forecast history after the call (end_call).
    # Written to these fresh containers rather than the state's, so that a compiled model guards on
    # nothing that grows during a generation:
    events: list[tuple] = field(default_factory=list)
    outputs: dict[tuple[int, int, int], Any] = field(default_factory=dict)  # new module cache entries
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # token scores recorded at this step
    queries: dict[int, torch.Tensor] = field(default_factory=dict)  # attention scorer: queries until keys come
    block: int | None = None
    block_calls: dict[int, int] = field(default_factory=dict)
    bucket: tuple = ("model",)

    def image_rows(self, grid: str) -> int:
        frames, rows, cols = self.branch.grid
        return {"all": frames * rows * cols, "space": rows * cols, "time": frames}[grid]


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
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._instrumented: list[Any] = []  # schedulers whose set_timesteps we wrapped
        self._wrapped_contexts: list[torch.nn.Module] = []
        self.last_stats: dict[str, CacheStats] = {}
        self.fallback_selection: str | None = None
        self._warned_fused = False

    # ---- hooks ----------------------------------------------------------------------------------
    def attach(self) -> None:
        for d_index, den in enumerate(self.denoisers):
            check_no_foreign_cache_hooks(den.model)
            _registry(den.model).register_hook(DenoiserHook(self, d_index), HOOK_DENOISER)
            self._wrap_cache_context(den.model)
            last = len(den.infos) - 1
            for info in den.infos:
                _registry(info.block).register_hook(BlockHook(self, info, info.index == last), HOOK_BLOCK)
            for module, cached in den.modules:
                _registry(module).register_hook(ModuleHook(self, cached), HOOK_MODULE)
            self._attach_recorders(den)

    def _attach_recorders(self, den: Denoiser) -> None:
        selection = self.selection
        for block, (value, attn, rows) in den.value_modules.items():
            if selection == "vnorm":
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
        for scheduler in self._instrumented:
            if getattr(vars(scheduler).get("set_timesteps"), "_dualcache", False):
                del scheduler.set_timesteps
        self._wrapped_contexts.clear()
        self._instrumented.clear()
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
        pipe = self._pipeline() if self._pipeline is not None else None
        if pipe is None:
            return None
        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is not None and not getattr(vars(scheduler).get("set_timesteps"), "_dualcache", False):
            self._instrument(scheduler)
        return scheduler

    def _instrument(self, scheduler: Any) -> None:
        original = scheduler.set_timesteps

        @functools.wraps(original)
        def set_timesteps(*args: Any, **kwargs: Any):
            _bump_epoch(scheduler)
            return original(*args, **kwargs)

        set_timesteps._dualcache = True
        scheduler.set_timesteps = set_timesteps
        with self._lock:
            self._instrumented.append(scheduler)

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
        epoch = _epoch(scheduler)
        gen = getattr(self._local, "generation", None)
        if gen is None or gen.scheduler is not scheduler or gen.epoch != epoch:
            gen = Generation(scheduler, epoch, self._num_steps(scheduler))
            self._local.generation = gen
        return gen

    def _branch_key(self, den: Denoiser, gen: Generation, args: tuple, kwargs: dict, batch: int) -> tuple:
        name = getattr(self._local, "context", None)
        if name is None and den.adapter.branches_by_timestep:
            value = _timestep_value(den.adapter.timestep(args, kwargs), sync=True)
            if value != gen.timestep:
                gen.timestep, gen.calls_at_timestep = value, 0
            name = f"call{gen.calls_at_timestep}"
            gen.calls_at_timestep += 1
        return name, batch

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
        state = branch.models.get(d_index)
        if state is None:
            state = branch.models[d_index] = ModelState()
        signature = (tuple(latents.shape), latents.dtype, latents.device)
        costs = den.costs.get(signature)
        plan = den.plan(branch.plan_steps)
        primed = state.primed
        step_plan = plan.steps[branch.step] if primed else plan.steps[0]  # nothing cached yet: full
        if step_plan.skip_blocks and state.stack_cache is None:
            # the last block never ran in this branch (SD3's skip-layer guidance can skip it): reuse every
            # module instead of skipping the stack, since there is no stack output to stand in
            step_plan = dataclasses.replace(step_plan, skip_blocks=False, kind="reuse")
        state.primed = True
        keep = den.history_length(plan)
        # plan-derived flags hold for the plan's own step; a denoiser priming mid-generation records and stores
        recording = step_plan.is_full and (not primed or den.scored_steps(branch.plan_steps)[branch.step])
        passthrough = primed and costs is not None and den.unread_steps(branch.plan_steps)[branch.step]
        call = Call(den, branch, state, step_plan, recording=recording, counting=costs is None, history=keep,
                    actions=den.actions(step_plan), signature=signature, passthrough=passthrough)
        state.costs = costs if costs is not None else Costs()
        state.stats.step_kinds.append(step_plan.kind)
        state.stats.num_calls += 1
        if step_plan.is_full:
            state.staleness.clear()
        if not call.counting:
            state.stats.flops += costs.model
            if not step_plan.skip_blocks:
                state.stats.flops += sum(costs.blocks.values())
        self._local.call = call
        if not step_plan.is_full:  # this step's rows and forecast weights, chosen before the denoiser runs
            self._select_rows(call, latents.shape[0], latents.device)
            if step_plan.forecast_order:
                self._forecast_weights(call)
        return call

    def _select_rows(self, call: Call, batch: int, device: torch.device) -> None:
        """Choose the rows of every partial module of this step, before the denoiser runs."""
        fractions = call.step_plan.fractions
        for _, cached in call.denoiser.modules:
            if (call.actions[cached.block][cached.column] != "partial" or not cached.spec.can_partial
                    or "image" not in cached.spec.calls):
                continue
            image = call.image_rows(cached.grid)
            k = num_fresh_tokens(fractions[cached.block][cached.column], image)
            if k:  # a block over part of the grid (a video's frames or pixels) sees them folded into its batch
                rows = batch * call.image_rows("all") // image
                picked = call.picks[(cached.block, cached.column)] = self._select(call, cached, k, rows, image, device)
                torch._dynamo.maybe_mark_dynamic(picked, 1)  # compiled: one graph whatever the step's token count

    def _forecast_weights(self, call: Call) -> None:
        """Lagrange weights of each stored history at this step (Python floats, one per stored output)."""
        order, step, memo = call.step_plan.forecast_order, call.branch.step, {}

        def weights(history: list[tuple[int, Any]]) -> tuple[float, ...] | None:
            steps = tuple(s for s, _ in history[-(order + 1):])
            if len(steps) < 2:
                return None
            if steps not in memo:
                memo[steps] = tuple(lagrange_weights(steps, step))
            return memo[steps]

        for key, history in call.state.history.items():
            w = weights(history)
            if w is not None:
                call.weights[key] = w
        call.stack_weights = weights(call.state.stack_history)

    @torch.compiler.disable
    def end_call(self, call: Call, signature: tuple) -> None:
        self._local.call = None
        den, state = call.denoiser, call.state
        if call.counting:
            den.costs[signature] = state.costs
            state.stats.flops += state.costs.per_call
        state.module_cache.update(call.outputs)
        state.scores.update(call.scores)
        self._account(call)
        state.stats.flops_uncached += state.costs.per_call
        for (_, column, _), (rows, _) in state.costs.rows.items():
            state.stats.tokens_total[den.layout.modules[column]] += rows
        state.stats.cache_bytes = max(state.stats.cache_bytes, state.cache_bytes())
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
                if call.history and call.step_plan.is_full:
                    _remember(state.stack_history, call.branch.step, state.stack_cache, call.history)
                continue
            if what == "score":
                stats.flops += event[1]
                stats.selection_flops += event[1]
                continue
            key, cached = event[1], event[2]
            full_rows, kv_rows = costs.rows.get(key, (0, 0))
            if what == "compute":
                if not call.counting:
                    stats.flops += costs.modules.get(key, 0)
                stats.tokens_computed[cached.name] += full_rows
                if call.history:
                    _remember(state.history.setdefault(key, []), call.branch.step, call.outputs[key],
                              call.history)
            elif what == "partial":
                computed = event[3] + call.picks[(cached.block, cached.column)].shape[1]
                full = cached.cost.flops(event[4], full_rows, kv_rows)
                if full:  # the measured full cost, scaled by the rows computed
                    share = cached.cost.flops(event[4], computed, kv_rows) / full
                    stats.flops += round(costs.modules.get(key, 0) * share)
                stats.tokens_computed[cached.name] += computed

    def _new_branch(
        self, den: Denoiser, gen: Generation, args: tuple, kwargs: dict, latents: torch.Tensor
    ) -> BranchState:
        batch = latents.shape[0]
        # one host sync per generation and branch, never per step
        paired = batch % 2 == 0 and bool(torch.equal(latents[: batch // 2], latents[batch // 2 :]))
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
            forecast = self._forecast(call.stack_weights, call.state.stack_history)
            return call.state.stack_cache if forecast is None else forecast
        call.block, call.block_calls, call.bucket = info.index, {}, ("block", info.index)
        try:
            output = forward(*args, **kwargs)
        finally:
            call.block, call.bucket = None, ("model",)
        if is_last:
            call.state.stack_cache = output
            call.events.append(("stack",))
        return output

    # ---- cached modules ---------------------------------------------------------------------------
    def run_module(self, cached: CachedModule, forward, args: tuple[Any, ...], kwargs: dict[str, Any]):
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
        partial = action == "partial" and cached.spec.can_partial and cached.call_kind(index) == "image"
        if action == "compute" or cache is None or (action == "partial" and not partial):
            return self._compute(call, cached, key, forward, args, kwargs)
        forecast = self._forecast(call.weights.get(key), state.history.get(key, ()))
        if not partial:
            return cache if forecast is None else forecast
        return self._recompute_rows(call, cached, key, cache, forward, args, kwargs, forecast)

    @staticmethod
    def _forecast(weights: tuple[float, ...] | None, history) -> Any:
        """The step's extrapolated output (weights from begin_call), or None where the step reuses as is."""
        if weights is None:
            return None
        return combine([entry[1] for entry in history[-len(weights):]], weights)

    def _compute(self, call: Call, cached: CachedModule, key: tuple, forward, args: tuple, kwargs: dict):
        state = call.state
        if call.counting:
            call.bucket = ("module", key)
            try:
                output = forward(*args, **kwargs)
            finally:
                call.bucket = ("block", cached.block)
            hidden = _hidden(args, kwargs)
            state.costs.rows[key] = (hidden.shape[1], _kv_rows(hidden, kwargs))
        else:
            output = forward(*args, **kwargs)
        call.outputs[key] = output
        call.events.append(("compute", key, cached))
        return output

    def _recompute_rows(self, call: Call, cached: CachedModule, key: tuple, cache: torch.Tensor,
                        forward, args: tuple, kwargs: dict, forecast: torch.Tensor | None = None):
        """Recompute the selected rows and write them into the cache (or, when forecasting, into this
        step's forecast, leaving the stored full computations as they are)."""
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
        elif call.history:  # the cached tensor is also the newest stored full computation: keep that intact
            cache = call.outputs[key] = cache.clone()
        picked = call.picks.get((cached.block, cached.column))  # (batch, k) image rows, chosen in begin_call
        if picked is None:  # no row to recompute at this step
            return cache
        if text:
            text_index = torch.arange(text, device=hidden.device).expand(batch, text)
            if cached.spec.text_rows == "first":
                picked = torch.cat([text_index, picked + text], dim=1)
            else:
                picked = torch.cat([picked, text_index + image], dim=1)
        # rows of the flattened (batch * rows) matrix: one index_select / index_copy_ instead of expand + gather
        flat = (picked + torch.arange(batch, device=picked.device).unsqueeze(1) * rows).reshape(-1)
        gathered = hidden.reshape(batch * rows, -1).index_select(0, flat).view(batch, picked.shape[1], -1)
        rest, kwargs = (args[1:], dict(kwargs)) if args else ((), dict(kwargs))
        kwargs.pop("hidden_states", None)
        if cached.spec.role == "self_attention":
            kwargs["encoder_hidden_states"] = hidden  # selected queries against all keys / values
        fresh = forward(gathered, *rest, **kwargs)
        fresh = fresh.to(cache.dtype).reshape(flat.shape[0], -1)
        if torch.is_grad_enabled():  # keep autograd's saved tensors intact
            cache = cache.reshape(batch * rows, -1).index_copy(0, flat, fresh).view(cache.shape)
            if forecast is None:
                call.outputs[key] = cache
        else:
            if not cache.is_contiguous():
                cache = cache.contiguous()
                if forecast is None:
                    call.outputs[key] = cache
            cache.view(batch * rows, -1).index_copy_(0, flat, fresh)
        call.events.append(("partial", key, cached, text, batch))
        return cache

    def _select(self, call: Call, cached: CachedModule, k: int, batch: int, tokens: int, device) -> torch.Tensor:
        group_key = (cached.block, cached.spec.group or cached.column)
        chosen = call.selections.get(group_key)
        if chosen is not None and chosen.shape[1] == k:
            return chosen
        paired = call.branch.paired and batch % 2 == 0
        groups = batch // 2 if paired else batch
        state = call.state
        base = None if self.selection == "random" else state.scores.get(cached.block)
        if base is None and (self.selection == "random" or self._fused(call, cached.block)):
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
        if not self.last_stats:
            return CacheStats()
        return CacheStats.merge(list(self.last_stats.values()))


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
            if call.counting:  # the FLOPs recorder is a dispatch mode: this one call runs eagerly
                with _FlopRecorder(self.engine):
                    output = torch.compiler.disable(self.fn_ref.original_forward)(*args, **kwargs)
            else:
                output = self.fn_ref.original_forward(*args, **kwargs)
        except BaseException:
            self.engine._local.call = None
            self.engine.reset()  # an interrupted generation leaves nothing half-done behind
            raise
        self.engine.end_call(call, call.signature)
        return output


class BlockHook(ModelHook):
    def __init__(self, engine: DualCacheEngine, info: BlockInfo, is_last: bool) -> None:
        super().__init__()
        self.engine, self.info, self.is_last = engine, info, is_last

    def new_forward(self, module, *args, **kwargs):
        return self.engine.run_block(self.info, self.is_last, self.fn_ref.original_forward, args, kwargs)


class ModuleHook(ModelHook):
    def __init__(self, engine: DualCacheEngine, cached: CachedModule) -> None:
        super().__init__()
        self.engine, self.cached = engine, cached

    def new_forward(self, module, *args, **kwargs):
        return self.engine.run_module(self.cached, self.fn_ref.original_forward, args, kwargs)


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


def _kv_rows(hidden: torch.Tensor, kwargs: dict) -> int:
    encoder = kwargs.get("encoder_hidden_states")
    return hidden.shape[1] if encoder is None else encoder.shape[1]


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
    encoder = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
    return (hidden, encoder) if outputs == "h,e" else (encoder, hidden)


def _timestep_value(timestep: Any, sync: bool) -> float | None:
    """The call's timestep as a float, read only where that costs no host sync (or ``sync`` allows it)."""
    if timestep is None:
        return None
    if isinstance(timestep, (int, float)):
        return float(timestep)
    if isinstance(timestep, torch.Tensor) and timestep.numel() and (sync or timestep.device.type == "cpu"):
        return float(timestep.detach().reshape(-1)[0])
    return None


def _remember(history: list[tuple[int, Any]], step: int, value: Any, keep: int) -> None:
    history.append((step, value))
    del history[:-keep]


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []
