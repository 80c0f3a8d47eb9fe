"""What an adapter tells the engine about one model family, declared as data.

An adapter lists the model's block lists in execution order and, for each, the cached modules of
a block with their role, where text rows sit among their rows, and how the block's input and
output are laid out. The engine derives everything else (hooks, plan layout, skipping the stack,
partial recompute) from these declarations; code in an adapter is only needed where data cannot
say it (how to read the token grid from a call's inputs).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..partial_attention import RotaryAttention
from ..plan import PlanLayout

#: module roles; see ModuleSpec.role
ROLES = ("self_attention", "joint_attention", "cross_attention", "mlp", "text_mlp", "single")
#: roles whose rows can be recomputed independently (given a token-wise module)
_ROW_WISE_ROLES = ("cross_attention", "mlp", "single")
TEXT_ROWS = ("none", "first", "last")
LAYOUTS = ("h", "h,e", "e,h")
GRIDS = ("all", "space", "time")
KERNELS = ("softmax", "linear")


@dataclass(frozen=True)
class ModuleSpec:
    """One cached module of a block.

    Attributes:
        name: attribute of the block (``"attn1"``, ``"ff"``, ``"proj_mlp"``, ...).
        role: ``"self_attention"`` (image tokens attend to each other), ``"joint_attention"`` (text
            and image tokens attend together; returns a tuple or covers text rows), ``"cross_attention"``
            (image queries against text keys), ``"mlp"``, ``"text_mlp"`` (the text stream's MLP),
            ``"single"`` (a projection of a single-stream block, over text and image rows).
        token_wise: each output row depends on its input row only (False for Sana's conv MLP).
        text_rows: where text rows sit among the module's rows: ``"none"``, ``"first"`` ([T; N]),
            ``"last"`` ([N; T]). Partial recompute always recomputes text rows.
        group: modules of one block that recompute the same rows (single-stream blocks).
        calls: what each call of the module within one block sees, when a block calls it more than
            once (CogView4 runs ``ff`` on image rows, then on text rows): ``"image"`` or ``"text"``.
        partial_attention: for self-attention, the processor accepts selected queries with
            ``encoder_hidden_states`` = all rows (plain processors without rotary embeddings).
        rotary: for self- or joint attention with a rotary embedding, how the module receives and
            applies it; the engine then computes selected queries (plus every text row) against all
            keys and values itself, with the table sliced to the selected rows (see
            ``partial_attention.RotaryAttention``). A joint module returning ``(image, text)`` gets
            the selected image rows scattered into its cached image output and a fresh text output.
        kernel: how the attention core's cost grows with the rows (the FLOPs model of partial
            recompute): ``"softmax"`` (a query x key term) or ``"linear"`` (Sana's ReLU linear
            attention: a key-value summary over the key rows, then a product per query row).
    """

    name: str
    role: str
    token_wise: bool = True
    text_rows: str = "none"
    group: str | None = None
    calls: tuple[str, ...] = ("image",)
    partial_attention: bool = False
    rotary: RotaryAttention | None = None
    kernel: str = "softmax"

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"module {self.name!r}: kernel={self.kernel!r}; allowed: {', '.join(KERNELS)}")
        if self.role not in ROLES:
            raise ValueError(f"module {self.name!r}: role={self.role!r}; allowed: {', '.join(ROLES)}")
        if self.text_rows not in TEXT_ROWS:
            raise ValueError(f"module {self.name!r}: text_rows={self.text_rows!r}; allowed: {', '.join(TEXT_ROWS)}")

    @property
    def can_partial(self) -> bool:
        """Whether a conservative step may recompute a subset of this module's rows."""
        if not self.token_wise:
            return False
        if self.role == "self_attention":
            return self.partial_attention or self.rotary is not None
        if self.role == "joint_attention":
            return self.rotary is not None
        return self.role in _ROW_WISE_ROLES


@dataclass(frozen=True)
class BlockListSpec:
    """One ``nn.ModuleList`` of blocks.

    Attributes:
        attr: the model attribute holding the blocks.
        modules: the cached modules of its blocks (a block may lack some, e.g. SD3.5's ``attn2``).
        inputs / outputs: ``"h"`` (a tensor), ``"h,e"`` or ``"e,h"`` (image and text streams): how a
            block receives its streams (positionally or as ``hidden_states`` /
            ``encoder_hidden_states``) and returns them, so a skipped block can pass them through.
        value: dotted path, inside a block, of the module whose output is the self-attention value
            projection (V-caching scores); None when the block has none.
        value_text_rows: where text rows sit in that output.
        grid: which axes of the (frames, rows, cols) token grid a block's rows span: ``"all"``,
            ``"space"`` (frames folded into the batch), ``"time"`` (positions folded into the batch).
        input_norms: cached module name -> dotted path(s), inside a block, of the norm(s) whose output only
            cached modules read (through row-wise ops such as adaLN modulation); see
            :meth:`ModelAdapter.input_norms`. A norm several modules read is skipped where none computes.
        sole_readers: cached module name -> the cached module that alone reads its output (through row-wise
            ops that accept one row, e.g. an activation or a concatenation along features): where the reader
            computes nothing and the module would only forecast or reuse its output, it returns one row of
            zeros instead, so neither the forecast nor those ops cost more than a row.
    """

    attr: str
    modules: tuple[ModuleSpec, ...]
    inputs: str = "h"
    outputs: str = "h"
    value: str | None = None
    value_text_rows: str = "none"
    grid: str = "all"
    input_norms: Mapping[str, str | tuple[str, ...]] = field(default_factory=dict, hash=False)
    sole_readers: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.inputs not in ("h", "h,e") or self.outputs not in LAYOUTS:
            raise ValueError(f"block list {self.attr!r}: inputs={self.inputs!r}, outputs={self.outputs!r}")
        if self.grid not in GRIDS:
            raise ValueError(f"block list {self.attr!r}: grid={self.grid!r}; allowed: {', '.join(GRIDS)}")


@dataclass(frozen=True)
class ExpertSwitch:
    """Two denoisers splitting a generation by timestep (Wan 2.2 A14B): the pipeline runs its ``high`` attribute
    while the step's timestep is at least the pipeline config's ``config_key`` times the scheduler's
    ``num_train_timesteps``, then its ``low`` one. The engine plans each over the steps it runs."""

    config_key: str
    high: str
    low: str


@dataclass(frozen=True)
class BlockInfo:
    """One block in execution order, as the engine sees it."""

    index: int  # position in execution order over all lists
    name: str  # "transformer_blocks.3"
    block: torch.nn.Module
    spec: BlockListSpec
    modules: tuple[ModuleSpec, ...]  # the specs of the modules this block has


class ModelAdapter:
    """Subclass per model family and fill in the class attributes; override methods only if data can't say it."""

    #: class names of the denoisers this adapter handles, mapped to their preset family
    model_classes: dict[str, str] = {}
    #: block lists, in execution order (or interleaved, see below)
    block_lists: tuple[BlockListSpec, ...] = ()
    #: run the i-th block of every list in turn (Latte: spatial 0, temporal 0, spatial 1, ...)
    interleaved: bool = False
    #: the pipeline calls the denoiser once per CFG branch without a ``cache_context``, and may drive it with a
    #: scheduler that keeps no step counter: tell the branches apart by the order of calls at the same timestep
    #: (a host read per call). With a scheduler that has ``step_index`` (most), every family's calls without a
    #: ``cache_context`` are told apart by their order within its step, with no host read
    branches_by_timestep: bool = False
    #: config attributes holding the patch size of the token grid's (frames, rows, cols) axes; a scalar
    #: is that axis' size, a (t, h, w) tuple (Wan's ``patch_size``) gives every axis, an (h, w) tuple the
    #: spatial ones; a missing attribute is 1 (or the t of a (t, h, w) tuple named for another axis)
    patch_attrs: tuple[str | None, str, str] = ("patch_size_t", "patch_size", "patch_size")
    #: axes of 5-D latents: "BCFHW" (most video models) or "BFCHW" (CogVideoX)
    latent_layout: str = "BCFHW"
    #: the pipeline hands the generation from one denoiser to another at a timestep (None: one denoiser runs
    #: every step)
    expert_switch: ExpertSwitch | None = None
    #: keyword (or position) of the timestep in the denoiser call
    timestep_arg: tuple[str, int] = ("timestep", 2)
    #: call keywords whose tensors are the same for every sample (not batched), such as Flux's
    #: ``img_ids``: the L2C trainer passes them whole instead of slicing rows out of them
    shared_inputs: tuple[str, ...] = ()
    #: presets of this family by method name ("duca", "toca", "fora"), DualCacheConfig fields; methods
    #: left out take the default presets. Say in docs/methods.md whether each is published or ours.
    presets: dict[str, dict[str, Any]] = {}

    def supports(self, model: torch.nn.Module) -> bool:
        return type(model).__name__ in self.model_classes

    def family(self, model: torch.nn.Module) -> str:
        return self.model_classes[type(model).__name__]

    # ---- structure -----------------------------------------------------------------------------
    def block_infos(self, model: torch.nn.Module) -> list[BlockInfo]:
        """Every cached block in execution order, with the modules it has."""
        lists = [(spec, list(getattr(model, spec.attr, None) or ())) for spec in self.block_lists]
        order: list[tuple[BlockListSpec, int, torch.nn.Module]] = []
        if self.interleaved:
            for i in range(max(len(blocks) for _, blocks in lists)):
                order.extend((spec, i, blocks[i]) for spec, blocks in lists if i < len(blocks))
        else:
            order = [(spec, i, block) for spec, blocks in lists for i, block in enumerate(blocks)]
        infos = []
        for index, (spec, i, block) in enumerate(order):
            present = tuple(m for m in spec.modules if isinstance(getattr(block, m.name, None), torch.nn.Module))
            infos.append(BlockInfo(index, f"{spec.attr}.{i}", block, spec, present))
        return infos

    def blocks(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        return [info.block for info in self.block_infos(model)]

    def input_norms(self, block: torch.nn.Module, spec: BlockListSpec) -> Mapping[str, str | tuple[str, ...]]:
        """Cached module name -> dotted path(s), inside ``block``, of the norm(s) whose output only cached modules
        read (a norm may feed several, e.g. a single-stream block's attention and MLP projection).

        Where none of a norm's readers computes at a step (each output forecast or reused whole), the engine returns
        one row of the norm's input instead of running it, so the norm and what the block does with its rows before
        the modules (adaLN modulation) cost one row: the block's output is the same. By default the block list's
        declaration (``spec.input_norms``)."""
        return spec.input_norms

    def module_specs(self, model: torch.nn.Module) -> dict[str, ModuleSpec]:
        """One spec per module name (the first list's, where lists share a name), in plan column order.

        A summary: blocks of different lists may give one name different specs; the plan layout and
        the engine keep each block's own (:meth:`layout`, :meth:`block_infos`)."""
        specs: dict[str, ModuleSpec] = {}
        for info in self.block_infos(model):
            for spec in info.modules:
                if spec.name in specs and specs[spec.name].can_partial != spec.can_partial:
                    # the plan keeps one column per name: the weaker capability wins
                    weaker = spec if not spec.can_partial else specs[spec.name]
                    specs[spec.name] = weaker
                specs.setdefault(spec.name, spec)
        return specs

    def module_names(self, model: torch.nn.Module) -> tuple[str, ...]:
        """Names of the cached modules (the plan's columns), in order of first appearance."""
        return tuple(self.module_specs(model))

    def layout(self, model: torch.nn.Module) -> PlanLayout:
        """What a plan for this model describes: blocks, their modules, each module's role in each block."""
        infos = self.block_infos(model)
        specs = self.module_specs(model)
        return PlanLayout(
            modules=tuple(specs),
            block_modules=tuple(tuple(m.name for m in info.modules) for info in infos),
            block_names=tuple(info.name for info in infos),
            roles={name: spec.role for name, spec in specs.items()},
            partial=frozenset(name for name, spec in specs.items() if spec.can_partial),
            block_roles=tuple(tuple(m.role for m in info.modules) for info in infos),
            block_partial=tuple(frozenset(m.name for m in info.modules if m.can_partial) for info in infos),
        )

    def value_projection(self, block: torch.nn.Module):
        """(to_q, to_k, to_v, heads) of the block's self-attention (the L2C trainer reads V norms from it)."""
        for spec in self.block_lists:
            if spec.value and resolve(block, spec.value) is not None:
                attn = resolve(block, spec.value.rsplit(".", 1)[0])
                return attn.to_q, attn.to_k, attn.to_v, attn.heads
        raise TypeError(f"{type(block).__name__} has no value projection to record")

    # ---- per call -----------------------------------------------------------------------------
    def hidden_states(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        """The denoiser's latent input, for detecting new generations and CFG pairing."""
        return args[0] if args else kwargs["hidden_states"]

    def timestep(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        name, position = self.timestep_arg
        if name in kwargs:
            return kwargs[name]
        return args[position] if len(args) > position else None

    def token_grid(self, model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int, int]:
        """(frames, rows, cols) of image tokens. Default: latents (B, C, H, W) or (B, C, F, H, W)."""
        latents = self.hidden_states(args, kwargs)
        pt, ph, pw = patch_sizes(model.config, self.patch_attrs)
        if latents.ndim == 5:
            layout = self.latent_layout
            frames, rows, cols = (latents.shape[layout.index(axis)] for axis in "FHW")
            return frames // pt, rows // ph, cols // pw
        return 1, latents.shape[-2] // ph, latents.shape[-1] // pw


def patch_sizes(config: Any, attrs: tuple[str | None, str | None, str | None]) -> tuple[int, int, int]:
    """(t, h, w) patch sizes from the config attributes ``attrs`` named for the (frames, rows, cols) axes.

    A scalar is the size of its axis, a 3-tuple is (t, h, w) and gives the size of the axis it is
    named for, a 2-tuple is (h, w); an axis whose attribute is missing takes the t / h / w entry of a
    3-tuple named for another axis, or 1.
    """
    values = [getattr(config, attr, None) if attr else None for attr in attrs]
    triple = next((v for v in values if isinstance(v, (tuple, list)) and len(v) == 3), None)
    sizes = []
    for axis, value in enumerate(values):
        if value is None and triple is not None:
            value = triple[axis]
        elif isinstance(value, (tuple, list)):
            if len(value) == 3:
                value = value[axis]
            elif len(value) == 2:
                value = value[axis - 1] if axis else None
            else:
                raise ValueError(f"config {attrs[axis]}={tuple(value)!r}: a patch size is a number, (h, w) or "
                                 "(t, h, w)")
        sizes.append(int(value or 1))
    return sizes[0], sizes[1], sizes[2]


def resolve(root: torch.nn.Module, path: str) -> torch.nn.Module | None:
    """The submodule at dotted ``path`` under ``root``, or None."""
    module: Any = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module if isinstance(module, torch.nn.Module) else None
