"""The caching engine: diffusers ``ModelHook``s on the denoiser, its blocks and token-wise modules.

* The denoiser hook knows the step: it reads the step count from the pipeline's scheduler and
  notices a new generation when the pipeline calls ``scheduler.set_timesteps`` (which replaces
  ``scheduler.timesteps``), so every generation starts from empty caches and two calls with the
  same seed give the same image. Pipelines that call the denoiser once per CFG branch under
  diffusers' ``cache_context`` get one state per branch.
* Block hooks implement the aggressive "skip the block stack" step (blocks pass their input
  through, the last one returns the cached output of the stack).
* Module hooks on ``attn1`` / ``attn2`` / ``ff`` compute, reuse, or recompute a selected subset of
  tokens and scatter them into the module's cache. The block around them still applies its
  current gates and shifts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .adapters import ModelAdapter
from .config import DualCacheConfig
from .plan import CachePlan, StepPlan, num_fresh_tokens
from .selection import attention_score, attention_score_flops, random_base, select_tokens, vnorm_score
from .stats import CacheStats, ModuleCost, layer_flops

logger = logging.getLogger(__name__)

HOOK_DENOISER = "dualcache_denoiser"
HOOK_BLOCK = "dualcache_block"
HOOK_MODULE = "dualcache_module"
HOOK_RECORD = "dualcache_record"
ALL_HOOKS = (HOOK_DENOISER, HOOK_BLOCK, HOOK_MODULE, HOOK_RECORD)


@dataclass(frozen=True)
class CachedModule:
    block: int
    index: int  # position in the plan's module tuple
    name: str
    self_attention: bool
    cost: ModuleCost


@dataclass
class GenerationState:
    """Everything one generation (of one CFG branch) keeps between denoiser calls."""

    branch: str
    plan: CachePlan
    signature: tuple
    paired: bool  # the batch is [uncond, cond] copies of the same latents: halves share a selection
    grid: tuple[int, int] | None
    generator: torch.Generator
    step: int = -1
    step_plan: StepPlan | None = None
    module_cache: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    stack_cache: torch.Tensor | None = None
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # per block, from the last full step
    staleness: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    query: dict[int, torch.Tensor] = field(default_factory=dict)  # attention scorer only
    overhead_model: int = 0  # FLOPs per call outside the blocks
    overhead_block: dict[int, int] = field(default_factory=dict)  # FLOPs per block outside cached modules
    full_module_flops: int = 0
    tokens_per_call: dict[str, int] = field(default_factory=dict)
    stats: CacheStats = field(default_factory=CacheStats)

    @property
    def recording(self) -> bool:
        return self.step_plan is not None and self.step_plan.is_full

    def cache_bytes(self) -> int:
        tensors = [*self.module_cache.values(), *self.scores.values(), *self.staleness.values()]
        if self.stack_cache is not None:
            tensors.append(self.stack_cache)
        return sum(t.numel() * t.element_size() for t in tensors)


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class DualCacheEngine:
    """Owns the hooks on one denoiser and the per-generation state they share."""

    def __init__(
        self,
        model: torch.nn.Module,
        adapter: ModelAdapter,
        config: DualCacheConfig,
        scheduler: Any | None = None,
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.config = config
        self.scheduler = scheduler
        self.blocks = adapter.blocks(model)
        self.module_names = adapter.module_names(model)
        self.states: dict[str, GenerationState] = {}
        self.current: GenerationState | None = None
        self.last_stats: dict[str, CacheStats] = {}
        self._timesteps_ref: Any = None
        self._plans: dict[int, CachePlan] = {}
        self._in_block: int | None = None
        self._recorders: list[torch.utils.hooks.RemovableHandle] = []
        self._cached_layers: set[int] = set()
        self._denoiser_hook: DenoiserHook | None = None
        self.cached_modules: list[CachedModule] = []

    # ---- hooks -----------------------------------------------------------------------------
    def attach(self) -> None:
        self._denoiser_hook = DenoiserHook(self)
        HookRegistry.check_if_exists_or_initialize(self.model).register_hook(self._denoiser_hook, HOOK_DENOISER)
        last = len(self.blocks) - 1
        for b, block in enumerate(self.blocks):
            HookRegistry.check_if_exists_or_initialize(block).register_hook(BlockHook(self, b, b == last), HOOK_BLOCK)
            for i, name in enumerate(self.module_names):
                module = getattr(block, name)
                spec = CachedModule(b, i, name, name in self.adapter.self_attention_modules, ModuleCost.of(module))
                self.cached_modules.append(spec)
                HookRegistry.check_if_exists_or_initialize(module).register_hook(ModuleHook(self, spec), HOOK_MODULE)
                self._cached_layers.update(id(m) for m in module.modules())
            to_q, to_k, to_v, heads = self.adapter.value_projection(block)
            if self.config.selection == "attention":
                HookRegistry.check_if_exists_or_initialize(to_q).register_hook(QueryRecorder(self, b), HOOK_RECORD)
                HookRegistry.check_if_exists_or_initialize(to_k).register_hook(
                    AttentionRecorder(self, b, heads), HOOK_RECORD
                )
            elif self.config.selection == "vnorm":
                recorder = ValueRecorder(self, b, heads)
                HookRegistry.check_if_exists_or_initialize(to_v).register_hook(recorder, HOOK_RECORD)

    def detach(self) -> None:
        self._stop_recording_layers()
        for module in self.model.modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None:
                continue
            for name in ALL_HOOKS:
                registry.remove_hook(name, recurse=False)
            if not registry.hooks:
                del module._diffusers_hook
                # HookRegistry leaves the original bound method as an instance attribute
                if "forward" in vars(module) and getattr(module.forward, "__func__", None) is type(module).forward:
                    del module.forward
        self.reset()

    def reset(self) -> None:
        self.states.clear()
        self.current = None
        self._timesteps_ref = None

    # ---- per call --------------------------------------------------------------------------
    def branch_name(self) -> str:
        context = self._denoiser_hook.context_state._context if self._denoiser_hook else None
        return context.name if context is not None else "default"

    def begin_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        latents = self.adapter.hidden_states(args, kwargs)
        if self.scheduler is not None and getattr(self.scheduler, "timesteps", None) is not self._timesteps_ref:
            self._timesteps_ref = getattr(self.scheduler, "timesteps", None)
            self._finish_generation()
        branch = self.branch_name()
        state = self.states.get(branch)
        signature = (tuple(latents.shape), latents.dtype, latents.device)
        if state is None or state.step + 1 >= state.plan.num_steps or state.signature != signature:
            if state is not None:
                self._finish_generation()
            state = self._new_state(branch, latents, signature)
            self.states[branch] = state
        state.step += 1
        state.step_plan = state.plan.steps[state.step]
        self.current = state
        state.stats.step_kinds.append(state.step_plan.kind)
        state.stats.num_calls += 1
        if state.step_plan.is_full:
            state.staleness.clear()
        if state.step == 0:
            self._start_recording_layers()
        else:
            state.stats.flops += state.overhead_model
            if not state.step_plan.skip_blocks:
                state.stats.flops += sum(state.overhead_block.values())

    def end_call(self) -> None:
        state = self.current
        if state is None:
            return
        if state.step == 0:
            self._stop_recording_layers()
            state.full_module_flops = state.stats.flops - state.stats.selection_flops
            state.tokens_per_call = dict(state.stats.tokens_computed)
            state.stats.flops += state.overhead_model + sum(state.overhead_block.values())
        state.stats.flops_uncached = state.stats.num_calls * self._full_call_flops(state)
        for name, tokens in state.tokens_per_call.items():
            state.stats.tokens_total[name] = state.stats.num_calls * tokens
        state.stats.cache_bytes = max(state.stats.cache_bytes, state.cache_bytes())
        self.last_stats = {name: s.stats for name, s in self.states.items()}

    def _full_call_flops(self, state: GenerationState) -> int:
        return state.overhead_model + sum(state.overhead_block.values()) + state.full_module_flops

    def _finish_generation(self) -> None:
        self.states.clear()

    def _num_steps(self) -> int:
        if self.scheduler is not None and getattr(self.scheduler, "timesteps", None) is not None:
            return len(self.scheduler.timesteps)
        if self.config.plan is not None:
            return self.config.plan.num_steps
        if self.config.num_inference_steps is not None:
            return self.config.num_inference_steps
        raise ValueError(
            "cannot tell the number of denoising steps: enable the cache on the pipeline (so the engine can "
            "read its scheduler), or pass num_inference_steps=... when caching a bare transformer"
        )

    def plan_for(self, num_steps: int) -> CachePlan:
        if num_steps not in self._plans:
            self._plans[num_steps] = self.config.build_plan(
                num_steps, len(self.blocks), self.module_names, self.adapter.self_attention_modules
            )
        return self._plans[num_steps]

    def _new_state(self, branch: str, latents: torch.Tensor, signature: tuple) -> GenerationState:
        batch = latents.shape[0]
        paired = batch % 2 == 0 and torch.equal(latents[: batch // 2], latents[batch // 2 :])
        generator = torch.Generator(device=latents.device)
        generator.manual_seed(self.config.seed)
        return GenerationState(
            branch=branch,
            plan=self.plan_for(self._num_steps()),
            signature=signature,
            paired=paired,
            grid=self.adapter.token_grid(self.model, latents),
            generator=generator,
        )

    # ---- FLOPs of everything outside the cached modules, recorded at the first call ----------
    def _start_recording_layers(self) -> None:
        self._stop_recording_layers()
        counted = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
        for layer in self.model.modules():
            if isinstance(layer, counted) and id(layer) not in self._cached_layers:
                self._recorders.append(layer.register_forward_hook(self._record_layer))

    def _stop_recording_layers(self) -> None:
        for handle in self._recorders:
            handle.remove()
        self._recorders.clear()

    def _record_layer(self, layer: torch.nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        state = self.current
        flops = layer_flops(layer, inputs, output)
        if self._in_block is None:
            state.overhead_model += flops
        else:
            state.overhead_block[self._in_block] = state.overhead_block.get(self._in_block, 0) + flops

    # ---- blocks ----------------------------------------------------------------------------
    def run_block(self, index: int, is_last: bool, forward, args: tuple[Any, ...], kwargs: dict[str, Any]):
        state = self.current
        if state.step_plan.skip_blocks:
            if is_last:
                return state.stack_cache
            return args[0] if args else kwargs["hidden_states"]
        self._in_block = index
        try:
            output = forward(*args, **kwargs)
        finally:
            self._in_block = None
        if is_last:
            state.stack_cache = output
        return output

    # ---- token-wise modules ------------------------------------------------------------------
    def run_module(self, spec: CachedModule, forward, args: tuple[Any, ...], kwargs: dict[str, Any]):
        state = self.current
        key = (spec.block, spec.index)
        fraction = state.step_plan.fractions[spec.block][spec.index]
        hidden = args[0] if args else kwargs["hidden_states"]
        batch, tokens = hidden.shape[0], hidden.shape[1]
        kv_rows = self._kv_rows(spec, hidden, kwargs)
        if fraction >= 1.0:
            output = forward(*args, **kwargs)
            state.module_cache[key] = output
            self._count(state, spec, batch, tokens, tokens, kv_rows)
            return output
        cache = state.module_cache.get(key)
        if cache is None:
            raise RuntimeError(
                f"block {spec.block} {spec.name}: nothing cached to reuse at step {state.step}; "
                "a plan must compute every module before reusing it"
            )
        k = num_fresh_tokens(fraction, tokens)
        if k == 0:
            return cache
        index = self._select(state, spec, k, batch, tokens, hidden.device)  # (batch, k)
        gather_index = index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        rows = hidden.gather(1, gather_index)
        rest, kwargs = (args[1:], dict(kwargs)) if args else ((), dict(kwargs))
        if not args:
            kwargs.pop("hidden_states")
        if spec.self_attention:
            kwargs["encoder_hidden_states"] = hidden  # selected queries against all keys / values
        fresh = forward(rows, *rest, **kwargs)
        cache.scatter_(1, index.unsqueeze(-1).expand(-1, -1, cache.shape[-1]), fresh.to(cache.dtype))
        self._count(state, spec, batch, k, tokens, kv_rows)
        return cache

    @staticmethod
    def _kv_rows(spec: CachedModule, hidden: torch.Tensor, kwargs: dict[str, Any]) -> int:
        if spec.cost.per_kv_row == 0 and spec.cost.per_pair == 0:
            return 0
        encoder = kwargs.get("encoder_hidden_states")
        return hidden.shape[1] if encoder is None else encoder.shape[1]

    @staticmethod
    def _count(state: GenerationState, spec: CachedModule, batch: int, rows: int, tokens: int, kv_rows: int) -> None:
        state.stats.flops += spec.cost.flops(batch, rows, kv_rows)
        state.stats.tokens_computed[spec.name] += batch * rows

    def _select(
        self, state: GenerationState, spec: CachedModule, k: int, batch: int, tokens: int, device: torch.device
    ) -> torch.Tensor:
        groups = batch // 2 if state.paired else batch
        if self.config.selection == "random":
            base = random_base(groups, tokens, state.generator, device)
        else:
            base = state.scores.get(spec.block)
            if base is None:
                raise RuntimeError(f"block {spec.block}: no token scores recorded; the first step must be full")
        key = (spec.block, spec.index)
        staleness = state.staleness.get(key)
        if staleness is None:
            staleness = state.staleness[key] = torch.zeros((groups, tokens), device=device)
        index = select_tokens(
            base,
            k,
            staleness,
            self.config.staleness_weight,
            self.config.interval,
            state.grid,
            self.config.spatial_grid,
            self.config.spatial_bonus,
        )
        staleness.add_(1.0).scatter_(1, index, 0.0)
        return torch.cat([index, index]) if state.paired else index

    # ---- score recording at full steps ---------------------------------------------------------
    def record_value(self, block: int, value: torch.Tensor, heads: int) -> None:
        state = self.current
        if state is None or not state.recording:
            return
        state.scores[block] = vnorm_score(value, heads, state.paired)

    def record_query(self, block: int, query: torch.Tensor) -> None:
        state = self.current
        if state is not None and state.recording:
            state.query[block] = query

    def record_key(self, block: int, key: torch.Tensor, heads: int) -> None:
        state = self.current
        if state is None or not state.recording or block not in state.query:
            return
        query = state.query.pop(block)
        state.scores[block] = attention_score(query, key, heads, state.paired)
        extra = attention_score_flops(query.shape[0], query.shape[1], query.shape[2])
        state.stats.flops += extra
        state.stats.selection_flops += extra


class DenoiserHook(ModelHook):
    """Step bookkeeping around every denoiser call."""

    _is_stateful = True

    def __init__(self, engine: DualCacheEngine) -> None:
        super().__init__()
        self.engine = engine
        # diffusers sets the pipeline's cache context (cond / uncond branch) on StateManagers
        self.context_state = StateManager(_NoState)

    def pre_forward(self, module, *args, **kwargs):
        self.engine.begin_call(args, kwargs)
        return args, kwargs

    def post_forward(self, module, output):
        self.engine.end_call()
        return output

    def reset_state(self, module):
        self.engine.reset()
        return module


class BlockHook(ModelHook):
    def __init__(self, engine: DualCacheEngine, index: int, is_last: bool) -> None:
        super().__init__()
        self.engine, self.index, self.is_last = engine, index, is_last

    def new_forward(self, module, *args, **kwargs):
        return self.engine.run_block(self.index, self.is_last, self.fn_ref.original_forward, args, kwargs)


class ModuleHook(ModelHook):
    def __init__(self, engine: DualCacheEngine, spec: CachedModule) -> None:
        super().__init__()
        self.engine, self.spec = engine, spec

    def new_forward(self, module, *args, **kwargs):
        return self.engine.run_module(self.spec, self.fn_ref.original_forward, args, kwargs)


class ValueRecorder(ModelHook):
    """Records value-vector norms of a block's self-attention at full steps (V-caching)."""

    def __init__(self, engine: DualCacheEngine, block: int, heads: int) -> None:
        super().__init__()
        self.engine, self.block, self.heads = engine, block, heads

    def post_forward(self, module, output):
        self.engine.record_value(self.block, output, self.heads)
        return output


class QueryRecorder(ModelHook):
    def __init__(self, engine: DualCacheEngine, block: int) -> None:
        super().__init__()
        self.engine, self.block = engine, block

    def post_forward(self, module, output):
        self.engine.record_query(self.block, output)
        return output


class AttentionRecorder(ModelHook):
    def __init__(self, engine: DualCacheEngine, block: int, heads: int) -> None:
        super().__init__()
        self.engine, self.block, self.heads = engine, block, heads

    def post_forward(self, module, output):
        self.engine.record_key(self.block, output, self.heads)
        return output
