"""Cache plans: what to do at every denoising step, for every block and cached module.

A plan is plain data. For each step it holds

* ``kind``: a label for people ("full", "conservative", "aggressive", "reuse", "learned", ...),
* ``skip_blocks``: replace the whole block stack by the cached final hidden state,
* ``skip_call``: do not run the denoiser at all; its output is forecast from its outputs at full steps,
* ``fractions[block][module]``: the fraction of tokens the module recomputes —
  ``1.0`` compute every token, ``0.0`` reuse the cached output, anything in between is a
  *partial* step that recomputes that fraction of tokens (chosen by the token scorer).

Builders for FORA, ToCa and DuCa live here; they follow the published schedules (see
``docs/methods.md``). A plan round-trips through JSON and prints a readable summary.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from .plan_schema import MAX_FORECAST_ORDER, MAX_FORECAST_WEIGHT, loads_plan_json, validate_plan_dict

#: 2 added block_modules / block_names (models whose blocks differ); 3 added steps[].forecast_weights
#: (learned linear forecasts); 4 added steps[].skip_call; older versions still load, and a plan is written with
#: the lowest version it needs
PLAN_FORMAT_VERSION = 4


@dataclass(frozen=True)
class PlanLayout:
    """The part of a model a plan describes: its blocks in execution order and their cached modules.

    ``modules`` are the plan's columns (every module name of any block); ``block_modules[b]`` are the
    ones block ``b`` has (a cell of a module a block lacks is ignored). ``block_roles[b]`` gives the
    role (see ``adapters.base.ROLES``) of each of block ``b``'s modules, in the order of
    ``block_modules[b]``, and ``block_partial[b]`` names those whose rows can be recomputed one by
    one: one module name may play different roles in different block lists (Lumina2's
    ``feed_forward`` is the caption's MLP in the context refiner, the image MLP in the main layers).
    ``roles`` and ``partial`` summarise them per name (the first block's role; partial only where
    every block allows it) and stand in for the per-block fields when those are empty.
    """

    modules: tuple[str, ...]
    block_modules: tuple[tuple[str, ...], ...]
    block_names: tuple[str, ...] = ()
    roles: dict[str, str] = field(default_factory=dict)
    partial: frozenset[str] = frozenset()
    block_roles: tuple[tuple[str, ...], ...] = ()
    block_partial: tuple[frozenset[str], ...] = ()

    def __post_init__(self) -> None:
        for name, per_block in (("block_roles", self.block_roles), ("block_partial", self.block_partial)):
            if per_block and len(per_block) != len(self.block_modules):
                raise ValueError(f"PlanLayout.{name} has {len(per_block)} entries for {len(self.block_modules)} blocks")
        for b, (names, roles) in enumerate(zip(self.block_modules, self.block_roles)):
            if len(names) != len(roles):
                raise ValueError(f"PlanLayout.block_roles[{b}] has {len(roles)} roles for the modules {names}")

    @property
    def num_blocks(self) -> int:
        return len(self.block_modules)

    def role(self, block: int, module: str) -> str:
        """The role of ``module`` in block ``block`` ("mlp" where nothing says otherwise)."""
        if self.block_roles and module in self.block_modules[block]:
            return self.block_roles[block][self.block_modules[block].index(module)]
        return self.roles.get(module, "mlp")

    def can_partial(self, block: int, module: str) -> bool:
        """Whether block ``block`` may recompute a subset of ``module``'s rows."""
        if self.block_partial:
            return module in self.block_partial[block]
        return module in self.partial

    @property
    def uniform(self) -> bool:
        return all(tuple(b) == tuple(self.modules) for b in self.block_modules)

    @classmethod
    def uniform_layout(
        cls, num_blocks: int, modules: Sequence[str], self_attention_modules: Sequence[str] = ("attn1",),
        partial_self_attention: bool = True,
    ) -> PlanLayout:
        """Every block has every module (DiT / PixArt style): attention modules named in
        ``self_attention_modules``, the rest MLP or cross-attention, all recomputable row by row."""
        roles = {m: "self_attention" if m in self_attention_modules else ("cross_attention" if m == "attn2" else "mlp")
                 for m in modules}
        partial = {m for m in modules if m not in self_attention_modules or partial_self_attention}
        return cls(tuple(modules), tuple(tuple(modules) for _ in range(num_blocks)), roles=roles,
                   partial=frozenset(partial))


def check_forecast_weights(where: str, weights: Sequence[float], order: int) -> None:
    """A ValueError unless ``weights`` are learned forecast weights a step of ``order`` may carry."""
    if order < 1:
        raise ValueError(f"{where}: forecast_weights need forecast_order >= 1 (the Lagrange fallback), got {order}")
    if not 2 <= len(weights) <= MAX_FORECAST_ORDER + 1:
        raise ValueError(f"{where}: forecast_weights has {len(weights)} entries; allowed: 2 to "
                         f"{MAX_FORECAST_ORDER + 1} (one per stored full computation, oldest first)")
    for w in weights:
        if not (math.isfinite(w) and abs(w) <= MAX_FORECAST_WEIGHT):
            raise ValueError(f"{where}: forecast weight {w!r} is not a finite number in "
                             f"[-{MAX_FORECAST_WEIGHT:g}, {MAX_FORECAST_WEIGHT:g}]")


class Action(str, Enum):
    COMPUTE = "compute"
    PARTIAL = "partial"
    REUSE = "reuse"

    @property
    def symbol(self) -> str:
        return {"compute": "C", "partial": "P", "reuse": "R"}[self.value]


def action_of(fraction: float) -> Action:
    if fraction >= 1.0:
        return Action.COMPUTE
    if fraction <= 0.0:
        return Action.REUSE
    return Action.PARTIAL


def num_fresh_tokens(fraction: float, num_tokens: int) -> int:
    """Tokens a module recomputes for ``fraction`` (top-k = int(ratio * tokens), as published)."""
    if fraction >= 1.0:
        return num_tokens
    return max(0, min(num_tokens, int(fraction * num_tokens)))


@dataclass
class StepPlan:
    kind: str
    fractions: list[list[float]]
    skip_blocks: bool = False
    interval: int = 1  # length of the cache cycle this step belongs to (used by the staleness bonus)
    #: what a reused output (or the skipped stack) is at this step: 0 the cached output as it is,
    #: k >= 1 extrapolated from the last k + 1 full computations (a degree-k polynomial in the step)
    forecast_order: int = 0
    #: learned forecast (optional): weights of the last ``len(forecast_weights)`` stored full computations,
    #: oldest first, used instead of the Lagrange weights of ``forecast_order`` (which stays the fallback
    #: while fewer are stored); see :mod:`.forecast_fit`
    forecast_weights: tuple[float, ...] | None = None
    #: skip the whole denoiser call: its output is the forecast (``forecast_order``; 0 = the last full call's
    #: output) of its outputs at full steps, and the call costs nothing (no embedding, block or final layer)
    skip_call: bool = False

    def __post_init__(self) -> None:
        if self.forecast_weights is not None:
            self.forecast_weights = tuple(float(w) for w in self.forecast_weights)

    @property
    def history_length(self) -> int:
        """Full computations this step's forecast reads (0: the step reuses)."""
        if not self.forecast_order:
            return 0
        return max(self.forecast_order + 1, len(self.forecast_weights or ()))

    @property
    def is_full(self) -> bool:
        return not self.skip_blocks and not self.skip_call and all(f >= 1.0 for row in self.fractions for f in row)

    @property
    def skips_blocks(self) -> bool:
        """No block runs at this step (the stack or the whole call is skipped)."""
        return self.skip_blocks or self.skip_call

    def action(self, block: int, module: int) -> Action:
        if self.skips_blocks:
            return Action.REUSE
        return action_of(self.fractions[block][module])


@dataclass
class CachePlan:
    """Actions for ``num_steps`` denoiser calls x ``num_blocks`` blocks x ``modules``."""

    num_steps: int
    num_blocks: int
    modules: tuple[str, ...]
    steps: list[StepPlan]
    method: str = "custom"
    metadata: dict[str, Any] = field(default_factory=dict)
    #: modules present in each block (None: every module in every block)
    block_modules: tuple[tuple[str, ...], ...] | None = None
    block_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        self.modules = tuple(self.modules)
        if self.block_modules is not None:
            self.block_modules = tuple(tuple(b) for b in self.block_modules)
            if all(b == self.modules for b in self.block_modules):
                self.block_modules = None
        if self.block_names is not None:
            self.block_names = tuple(self.block_names)
        self.validate()
        if self.block_modules is not None:  # cells of modules a block lacks are ignored: keep them neutral
            for step in self.steps:
                for b, row in enumerate(step.fractions):
                    for m in range(len(row)):
                        if not self.present(b, m):
                            row[m] = 1.0

    @property
    def max_forecast_order(self) -> int:
        """The highest order a step forecasts cached outputs at (skipped calls forecast none)."""
        return max((step.forecast_order for step in self.steps if not step.skip_call), default=0)

    @property
    def history_length(self) -> int:
        """Full computations to keep per cached output (0: the plan never forecasts one)."""
        return max((step.history_length for step in self.steps if not step.skip_call), default=0)

    @property
    def output_history_length(self) -> int:
        """Full calls whose prediction to keep for the skipped calls (0: the plan skips none)."""
        return max((step.forecast_order + 1 for step in self.steps if step.skip_call), default=0)

    @property
    def forecasts_stack(self) -> bool:
        """Whether some step forecasts the skipped block stack (else its past outputs need not be kept)."""
        return any(step.skip_blocks and not step.skip_call and step.forecast_order for step in self.steps)

    @property
    def skips_calls(self) -> bool:
        """Whether some step skips the denoiser call (so its outputs at full steps are kept)."""
        return self.output_history_length > 0

    def present(self, block: int, module: int) -> bool:
        """Whether block ``block`` has the plan's module column ``module``."""
        return self.block_modules is None or self.modules[module] in self.block_modules[block]

    def fits(self, layout: PlanLayout) -> bool:
        """Whether this plan describes a model of ``layout`` (same blocks, modules and presence)."""
        mine = self.block_modules or tuple(self.modules for _ in range(self.num_blocks))
        return self.modules == tuple(layout.modules) and mine == tuple(tuple(b) for b in layout.block_modules)

    def describe_layout(self) -> str:
        if self.block_modules is None:
            return f"{self.num_blocks} blocks x {self.modules}"
        return f"{self.num_blocks} blocks (modules per block differ) x {self.modules}"

    def validate(self) -> None:
        if self.num_steps < 1 or len(self.steps) != self.num_steps:
            raise ValueError(f"plan has {len(self.steps)} steps but num_steps={self.num_steps}")
        for i, step in enumerate(self.steps):
            if len(step.fractions) != self.num_blocks:
                raise ValueError(
                    f"plan step {i} has {len(step.fractions)} blocks, expected num_blocks={self.num_blocks}"
                )
            for b, row in enumerate(step.fractions):
                if len(row) != len(self.modules):
                    raise ValueError(
                        f"plan step {i} block {b} has {len(row)} fractions, expected one per module "
                        f"{self.modules}"
                    )
                for f in row:
                    if not (0.0 <= f <= 1.0) or math.isnan(f):
                        raise ValueError(f"plan step {i} block {b}: fraction {f!r} is outside [0, 1]")
            if step.forecast_weights is not None:
                check_forecast_weights(f"plan step {i}", step.forecast_weights, step.forecast_order)
        if self.block_modules is not None:
            if len(self.block_modules) != self.num_blocks:
                raise ValueError(
                    f"plan block_modules has {len(self.block_modules)} entries, expected {self.num_blocks}"
                )
            for b, names in enumerate(self.block_modules):
                unknown = set(names) - set(self.modules)
                if unknown:
                    raise ValueError(f"plan block_modules[{b}] names modules {sorted(unknown)} not in {self.modules}")
        if self.block_names is not None and len(self.block_names) != self.num_blocks:
            raise ValueError(f"plan block_names has {len(self.block_names)} entries, expected {self.num_blocks}")
        if not self.steps[0].is_full:
            raise ValueError("the first step of a plan must be a full step: the caches start empty")

    # ---- reading -------------------------------------------------------------------------
    def step(self, index: int) -> StepPlan:
        return self.steps[index]

    def kinds(self) -> list[str]:
        return [s.kind for s in self.steps]

    def compute_fraction(self, module_weights: Sequence[float] | None = None) -> float:
        """Fraction of block-module compute the plan does, weighting modules by ``module_weights``."""
        weights = list(module_weights) if module_weights is not None else [1.0] * len(self.modules)
        total = done = 0.0
        for step in self.steps:
            for b, row in enumerate(step.fractions):
                for m, (w, f) in enumerate(zip(weights, row)):
                    if not self.present(b, m):
                        continue
                    total += w
                    done += 0.0 if step.skips_blocks else w * f
        return done / total if total else 1.0

    def placed(self, start: int, total: int) -> CachePlan:
        """This plan run from step ``start`` of a generation of ``total`` steps, full steps around it: the plan
        of a denoiser that runs only part of the generation (Wan 2.2's two experts), planned over the steps it
        runs and indexed by the generation's step. The steps outside are never run by that denoiser."""
        after = total - start - self.num_steps
        if start < 0 or after < 0:
            raise ValueError(f"a plan of {self.num_steps} steps cannot start at step {start} of {total}")
        if not start and not after:
            return self
        full = [StepPlan(FULL, _rows(self.num_blocks, len(self.modules), 1.0)) for _ in range(start + after)]
        return replace(self, num_steps=total, steps=full[:start] + self.steps + full[start:],
                       metadata={**self.metadata, "first_step": start, "last_step": start + self.num_steps - 1})

    # ---- resampling ----------------------------------------------------------------------
    def resample(self, num_steps: int) -> CachePlan:
        """The plan mapped onto ``num_steps`` denoiser calls by nearest normalized time.

        New step ``j`` copies old step ``i = floor((j + 0.5) * n_old / num_steps)`` (the old step whose
        time interval contains the new step's centre); step 0 is always a full step, whatever it maps
        to, because the caches start empty. A schedule learned for one step count is only an
        approximation at another (full / cache alternation, for one, is not preserved when the count
        shrinks); retrain for the new count where quality matters. See docs/plans.md.
        """
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps={num_steps!r} is not allowed; it must be an integer >= 1")
        old = self.num_steps
        steps = []
        for j in range(num_steps):
            i = min(old - 1, (2 * j + 1) * old // (2 * num_steps))
            src = self.steps[i]
            if j == 0 and not src.is_full:
                src = next((s for s in self.steps if s.is_full), self.steps[0])
            # learned forecast weights belong to the step spacing they were fitted for: dropped here
            steps.append(
                StepPlan(src.kind, [list(row) for row in src.fractions], src.skip_blocks, src.interval,
                         src.forecast_order, skip_call=src.skip_call)
            )
        metadata = dict(self.metadata)
        metadata["resampled"] = {"from_steps": old, "to_steps": num_steps, "rule": "nearest-normalized-time"}
        if "num_inference_steps" in metadata:
            metadata["num_inference_steps"] = num_steps
        return self._with_steps(num_steps, steps, metadata)

    def _with_steps(self, num_steps: int, steps: list[StepPlan], metadata: dict[str, Any]) -> CachePlan:
        return CachePlan(num_steps, self.num_blocks, self.modules, steps, method=self.method, metadata=metadata,
                         block_modules=self.block_modules, block_names=self.block_names)

    # ---- text ----------------------------------------------------------------------------
    def summary(self) -> str:
        counts = Counter(self.kinds())
        pattern = self.pattern()
        lines = [
            f"CachePlan[{self.method}]: {self.num_steps} steps x {self.describe_layout()}",
            f"  step pattern : {pattern}",
            "  step kinds   : " + ", ".join(f"{k}={n}" for k, n in sorted(counts.items())),
            f"  compute done : {self.compute_fraction():.1%} of block-module work (unweighted)",
        ]
        for i, step in enumerate(self.steps):
            if step.skip_call:
                desc = "skip the denoiser call (its output forecast from the full calls')"
            elif step.skip_blocks:
                desc = "skip block stack (reuse cached output of the last block)"
            else:
                per_module = []
                for m, name in enumerate(self.modules):
                    col = [row[m] for b, row in enumerate(step.fractions) if self.present(b, m)]
                    acts = {action_of(f).symbol for f in col}
                    mean = sum(col) / len(col)
                    per_module.append(f"{name}:{''.join(sorted(acts))}({mean:.2f})")
                desc = " ".join(per_module)
            lines.append(f"  step {i:3d} {step.kind:<12s} {desc}")
        return "\n".join(lines)

    def pattern(self) -> str:
        """One letter per step: F full, C conservative, A aggressive (the stack skipped), S the call skipped,
        R reuse, L learned, ? another kind."""
        symbols = {"full": "F", "conservative": "C", "aggressive": "A", "reuse": "R", "learned": "L"}
        return "".join("S" if s.skip_call else "A" if s.skip_blocks else symbols.get(s.kind, "?") for s in self.steps)

    def __str__(self) -> str:
        return self.summary()

    # ---- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        layout: dict[str, Any] = {}
        if self.block_modules is not None:
            layout["block_modules"] = [list(b) for b in self.block_modules]
        if self.block_names is not None:
            layout["block_names"] = list(self.block_names)
        learned = any(s.forecast_weights is not None for s in self.steps)
        return {
            "format": "dualcache-plan",
            # the lowest version that holds the plan, so older readers keep reading what they can
            "version": 4 if self.skips_calls else 3 if learned else (2 if layout else 1),
            "method": self.method,
            "num_steps": self.num_steps,
            "num_blocks": self.num_blocks,
            "modules": list(self.modules),
            **layout,
            "metadata": _finite_json(self.metadata),
            "steps": [
                {
                    "kind": s.kind,
                    "skip_blocks": s.skip_blocks,
                    "interval": s.interval,
                    "fractions": [[round(float(f), 6) for f in row] for row in s.fractions],
                    **({"forecast_order": s.forecast_order} if s.forecast_order else {}),
                    **({"forecast_weights": list(s.forecast_weights)} if s.forecast_weights is not None else {}),
                    **({"skip_call": True} if s.skip_call else {}),
                }
                for s in self.steps
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> CachePlan:
        """A plan from its JSON dict, checked field by field first (:mod:`.plan_schema`); nothing is coerced.

        ``source`` names the file in error messages."""
        validate_plan_dict(data, source)
        if data["version"] > PLAN_FORMAT_VERSION:
            raise ValueError(f"plan {source}: plan format version {data['version']} is newer than this library "
                             f"supports ({PLAN_FORMAT_VERSION})")
        steps = [
            StepPlan(
                kind=s["kind"],
                fractions=[[float(f) for f in row] for row in s["fractions"]],  # ints 0 / 1 -> 0.0 / 1.0
                skip_blocks=s.get("skip_blocks", False),
                interval=s.get("interval", 1),
                forecast_order=s.get("forecast_order", 0),
                forecast_weights=s.get("forecast_weights"),
                skip_call=s.get("skip_call", False),
            )
            for s in data["steps"]
        ]
        return cls(
            num_steps=data["num_steps"],
            num_blocks=data["num_blocks"],
            modules=tuple(data["modules"]),
            steps=steps,
            method=data["method"],
            metadata=dict(data.get("metadata", {})),
            block_modules=data.get("block_modules"),
            block_names=data.get("block_names"),
        )

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> CachePlan:
        """A plan from a JSON file (or JSON text starting with ``{``); every error names the file and field."""
        text = str(path_or_text)
        source = "<json text>"
        if isinstance(path_or_text, Path) or not text.lstrip().startswith("{"):
            path = Path(path_or_text)
            source = repr(str(path))
            if not path.is_file():
                raise FileNotFoundError(f"plan file {str(path)!r} does not exist")
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"plan {source}: not a UTF-8 text file ({error.reason} at byte {error.start}); "
                                 "a plan is a JSON file") from None
            except OSError as error:
                raise ValueError(f"plan {source}: cannot be read: {error.strerror or error}") from None
        return cls.from_dict(loads_plan_json(text, source), source)


# ---------------------------------------------------------------------------------------------
# Per-token recompute ratio schedules (ToCa's scheduler: fresh x step x layer x module factors)
# ---------------------------------------------------------------------------------------------
RatioFn = Callable[[int, int, int, int, str], float]  # (step, num_steps, block, num_blocks, module role)


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def constant_ratio(fresh_ratio: float) -> RatioFn:
    def ratio(step: int, num_steps: int, block: int, num_blocks: int, role: str) -> float:
        return fresh_ratio

    return ratio


def dit_ratio(fresh_ratio: float) -> RatioFn:
    """DuCa/ToCa DiT (DDIM) scheduler.

    step factor 3 - 4 s/steps with ``s`` counting down (so it is clamped to 0 for the first
    quarter of the run), layer factor 0.8 -> 1.2 over depth, MLP x2.5 (attention is never
    partially recomputed on DiT).
    """

    def ratio(step: int, num_steps: int, block: int, num_blocks: int, role: str) -> float:
        countdown = num_steps - 1 - step
        step_factor = 3.0 - 4.0 * countdown / num_steps
        layer_factor = _lerp(0.8, 1.2, block / max(1, num_blocks - 1))
        module_factor = {"mlp": 2.5, "single": 2.5}.get(role, 1.0)
        return min(1.0, max(0.0, fresh_ratio * step_factor * layer_factor * module_factor))

    return ratio


def _pixart_layer_module_factor(block: int, num_blocks: int, role: str) -> float:
    layer_factor = _lerp(1.6, 0.4, block / max(1, num_blocks - 1))
    return layer_factor * {"cross_attention": 0.6, "mlp": 1.6, "single": 1.6}.get(role, 1.0)


def pixart_ratio(fresh_ratio: float) -> RatioFn:
    """DuCa PixArt (DPM-Solver) scheduler: step 1.9 - 1.8 s/steps, layers 1.6 -> 0.4, cross-attn 0.6, MLP 1.6."""

    def ratio(step: int, num_steps: int, block: int, num_blocks: int, role: str) -> float:
        step_factor = 1.9 - 1.8 * step / num_steps
        value = fresh_ratio * step_factor * _pixart_layer_module_factor(block, num_blocks, role)
        return min(1.0, max(0.0, value))

    return ratio


def pixart_toca_ratio(fresh_ratio: float) -> RatioFn:
    """ToCa PixArt's *ratio* scheduler: the same step (1.9 -> 0.1), layer and module factors as DuCa's.

    (0.8 + 0.4 s/steps, used here before, is ToCa's *interval* scheduler, not its ratio scheduler.)
    """
    return pixart_ratio(fresh_ratio)


RATIO_SCHEDULES: dict[str, Callable[[float], RatioFn]] = {
    "constant": constant_ratio,
    "dit": dit_ratio,
    "pixart": pixart_ratio,
    "pixart-toca": pixart_toca_ratio,
}


# ---------------------------------------------------------------------------------------------
# Step schedules: which kind of step each denoiser call is
# ---------------------------------------------------------------------------------------------
FULL, CONSERVATIVE, AGGRESSIVE = "full", "conservative", "aggressive"
#: the kind a step that skips the denoiser call is recorded as (``cache_stats(...).step_kinds``; ``S`` in patterns)
SKIPPED_CALL = "skip"


def cycle_step_kinds(num_steps: int, interval: int, pattern: str, first_full: int = 1) -> list[str]:
    """Fixed cycles of ``interval`` steps counted up from step 0: position 0 is full.

    ``pattern`` "duca": odd positions conservative, even aggressive (F,C,A,C,A...);
    "toca": every other position conservative; "fora": every other position aggressive.
    """
    kinds = []
    offset = max(0, first_full - 1)  # the last of the leading full steps starts the first cycle
    for step in range(num_steps):
        pos = 0 if step < first_full else (step - offset) % interval
        if pos == 0:
            kinds.append(FULL)
        elif pattern == "toca":
            kinds.append(CONSERVATIVE)
        elif pattern == "fora":
            kinds.append(AGGRESSIVE)
        else:
            kinds.append(CONSERVATIVE if pos % 2 == 1 else AGGRESSIVE)
    return kinds


def dit_duca_step_kinds(num_steps: int, threshold: int = 3) -> list[str]:
    """DuCa's DiT schedule, as in the reference code (steps counted down, s = steps-1 ... 0).

    The first step is full. At each full step the interval is recomputed as
    N = round(threshold / (1.4 - 0.8 s / steps)), forced to 2 for s in [0.2, 0.4) x steps;
    then step s is full when s % N == 0, conservative when s % N is odd, aggressive when even.
    (The reference code re-decides the type in every layer, which can switch a step's type
    mid-stack; we decide once per step.)
    """
    kinds = []
    interval = 1
    forced = range(int(0.2 * num_steps), int(0.4 * num_steps))
    for step in range(num_steps):
        s = num_steps - 1 - step
        if step == 0 or s % interval == 0:
            kinds.append(FULL)
            interval = 2 if s in forced else max(1, round(threshold / (1.4 - 0.8 * s / num_steps)))
        else:
            kinds.append(CONSERVATIVE if (s % interval) % 2 == 1 else AGGRESSIVE)
    return kinds


def dit_toca_step_kinds(num_steps: int, threshold: int = 4) -> list[str]:
    """ToCa's DiT (DDIM) schedule: the full steps of :func:`dit_duca_step_kinds` (the same rule in the
    authors' ToCa code, ``fresh_threshold`` 4 published), every other step conservative.

    About 7 to 8 full steps in 20 (7 at threshold 4), 17 in 50."""
    return [FULL if kind == FULL else CONSERVATIVE for kind in dit_duca_step_kinds(num_steps, threshold)]


def _rows(num_blocks: int, num_modules: int, value: float) -> list[list[float]]:
    return [[value] * num_modules for _ in range(num_blocks)]


def conservative_fraction(
    layout: PlanLayout, module: str, ratio: float, self_attention: str = "reuse", block: int = 0
) -> float:
    """What a conservative step does with ``module`` of block ``block``: recompute ``ratio`` of its rows
    where it can, reuse it where it cannot (Sana's conv MLP; self- and joint attention unless "partial"),
    compute it whole for the text stream's MLP (text rows are few)."""
    role = layout.role(block, module)
    if role == "text_mlp":
        return 1.0
    attention = role in ("self_attention", "joint_attention")
    if not layout.can_partial(block, module) or (attention and self_attention != "partial"):
        return 0.0
    return ratio


def plan_from_kinds(
    kinds: Sequence[str],
    layout: PlanLayout,
    ratio_fn: RatioFn | None = None,
    aggressive: str = "skip",
    self_attention: str = "reuse",
    interval: int = 1,
    method: str = "custom",
    metadata: dict[str, Any] | None = None,
    forecast_order: int = 0,
) -> CachePlan:
    """Turn a list of step kinds into a plan for a model of ``layout``.

    conservative: each module does what :func:`conservative_fraction` says with the fraction
    ``ratio_fn(step, steps, block, blocks, role)``; aggressive: ``"skip"`` the block stack or
    ``"reuse"`` every module's cached output; :data:`SKIPPED_CALL`: skip the whole denoiser call.
    """
    num_steps, modules, num_blocks = len(kinds), layout.modules, layout.num_blocks
    steps = []
    for step, kind in enumerate(kinds):
        if kind == FULL:
            steps.append(StepPlan(FULL, _rows(num_blocks, len(modules), 1.0), interval=interval))
        elif kind == AGGRESSIVE:
            rows = _rows(num_blocks, len(modules), 0.0)
            steps.append(StepPlan(AGGRESSIVE, rows, skip_blocks=aggressive == "skip", interval=interval,
                                  forecast_order=forecast_order))
        elif kind == CONSERVATIVE:
            if ratio_fn is None:
                raise ValueError("conservative steps need a ratio_fn")
            rows = [
                [
                    conservative_fraction(
                        layout, m, ratio_fn(step, num_steps, b, num_blocks, layout.role(b, m)), self_attention, b
                    )
                    for m in modules
                ]
                for b in range(num_blocks)
            ]
            steps.append(StepPlan(CONSERVATIVE, rows, interval=interval, forecast_order=forecast_order))
        elif kind == SKIPPED_CALL:
            steps.append(StepPlan(SKIPPED_CALL, _rows(num_blocks, len(modules), 0.0), interval=interval,
                                  forecast_order=forecast_order, skip_call=True))
        else:
            raise ValueError(f"unknown step kind {kind!r}; allowed: full, conservative, aggressive, {SKIPPED_CALL}")
    return CachePlan(
        num_steps, num_blocks, modules, steps, method=method, metadata=dict(metadata or {}),
        block_modules=layout.block_modules, block_names=layout.block_names or None,
    )


def _layout(num_blocks: int | PlanLayout, modules: Sequence[str] | None) -> PlanLayout:
    if isinstance(num_blocks, PlanLayout):
        return num_blocks
    return PlanLayout.uniform_layout(num_blocks, modules or ())


def full_plan(num_steps: int, num_blocks: int | PlanLayout, modules: Sequence[str] | None = None) -> CachePlan:
    return plan_from_kinds([FULL] * num_steps, _layout(num_blocks, modules), method="full")


def fora_plan(
    num_steps: int, num_blocks: int | PlanLayout, modules: Sequence[str] | None = None, interval: int = 3
) -> CachePlan:
    """FORA: a full step every ``interval`` steps; every module's output is reused in between.
    Pass a model's :class:`PlanLayout`, or ``num_blocks`` and ``modules`` for uniform blocks."""
    kinds = cycle_step_kinds(num_steps, interval, "fora")
    return plan_from_kinds(
        kinds, _layout(num_blocks, modules), aggressive="reuse", interval=interval, method="fora",
        metadata={"interval": interval},
    )


def _finite_json(value: Any) -> Any:
    """Metadata as strict JSON: non-finite floats (e.g. DPM-Solver's ``lambda_min_clipped = -inf`` in a recorded
    scheduler config) become the strings "inf", "-inf", "nan", which the plan reader accepts (JSON has no such
    numbers, and the reader refuses them so that a corrupt plan names its field)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(item) for item in value]
    return value
