"""FLOPs, token and memory accounting.

FLOPs are matmul/convolution FLOPs (2 x multiply-adds), the quantity
``torch.utils.flop_counter.FlopCounterMode`` counts, so the two can be compared directly.
Cached modules are counted analytically from their layer shapes and the rows they process;
everything else the denoiser runs (patch embedding, timestep/class/caption embedders, adaLN
linears, final layer) is recorded once per generation from the shapes of its layers.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop, shape_wrapper

_KV_PROJECTIONS = ("to_k", "to_v")
#: projections of an added context (Wan I2V's image keys / values next to the text's, the text stream of a
#: joint attention): each key / value row goes through ``to_k`` / ``to_v`` or through these, never both, so
#: the key / value rows priced at ``to_k`` + ``to_v`` stand for them
_ADDED_KV_PROJECTIONS = ("add_k_proj", "add_v_proj")


@dataclass(frozen=True)
class ModuleCost:
    """FLOPs of one cached module as a function of the rows it processes (per sample)."""

    per_query_row: int  # linear layers applied to the module's input rows (queries / tokens)
    per_kv_row: int  # key/value projections (attention only), applied to the key/value rows
    per_pair: int  # attention core: QK^T and PV, per (query, key) pair

    @classmethod
    def of(cls, module: torch.nn.Module, kernel: str = "softmax") -> ModuleCost:
        """The cost of ``module``; ``kernel`` "linear" prices its attention core as linear attention
        (the key-value summary per key row, its product with the queries per query row)."""
        q = kv = 0
        for name, sub in module.named_modules():
            if isinstance(sub, torch.nn.Linear):
                flops = 2 * sub.in_features * sub.out_features
                if name.split(".")[-1] in _ADDED_KV_PROJECTIONS:
                    continue
                if name.split(".")[-1] in _KV_PROJECTIONS:
                    kv += flops
                else:
                    q += flops
        pair = 0
        if hasattr(module, "to_q") and hasattr(module, "heads"):
            if kernel == "linear":  # (d + 1) x d summary per head and key row (values padded with ones)
                head = module.to_q.out_features // module.heads
                core = 2 * module.heads * head * (head + 1)
                kv += core
                q += core
            else:
                pair = 4 * module.to_q.out_features
        return cls(q, kv, pair)

    def flops(self, batch: int, query_rows: int, kv_rows: int) -> int:
        per_sample = query_rows * self.per_query_row + kv_rows * self.per_kv_row
        return batch * (per_sample + query_rows * kv_rows * self.per_pair)


def weight_bytes(models: list[torch.nn.Module]) -> int:
    """Bytes of the parameters and buffers of ``models`` (tensors shared between them counted once)."""
    tensors = {id(t): t for m in models for t in (*m.parameters(), *m.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def layer_flops(module: torch.nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> int:
    """Matmul FLOPs of one call of a Linear or Conv layer, from its shapes."""
    if isinstance(module, torch.nn.Linear):
        rows = inputs[0].numel() // module.in_features
        return 2 * rows * module.in_features * module.out_features
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        kernel = 1
        for k in module.kernel_size:
            kernel *= k
        return 2 * output.numel() * (module.in_channels // module.groups) * kernel
    return 0


@dataclass
class CacheStats:
    """What one generation did, for one CFG branch or summed over branches."""

    step_kinds: list[str] = field(default_factory=list)
    flops: int = 0
    flops_uncached: int = 0
    tokens_computed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    tokens_total: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    cache_bytes: int = 0  # peak bytes of the caches (module outputs, stack output, forecast history, scores)
    history_bytes: int = 0  # part of cache_bytes kept only for forecasting (past full computations)
    weight_bytes: int = 0  # the cached denoisers' parameters and buffers
    cache_device: str | None = None  # where the caches were kept (None: on the model's device)
    num_calls: int = 0
    selection_flops: int = 0  # extra FLOPs of the scorer itself (attention score only)

    @property
    def num_steps(self) -> int:
        return len(self.step_kinds)

    @property
    def flops_speedup(self) -> float:
        return self.flops_uncached / self.flops if self.flops else float("nan")

    @property
    def step_counts(self) -> dict[str, int]:
        return dict(Counter(self.step_kinds))

    def token_fraction(self, module: str) -> float:
        total = self.tokens_total.get(module, 0)
        return self.tokens_computed.get(module, 0) / total if total else float("nan")

    def summary(self) -> str:
        lines = [
            f"steps: {self.num_steps}  " + "  ".join(f"{k}={v}" for k, v in sorted(self.step_counts.items())),
            f"denoiser FLOPs: {self.flops / 1e9:.3f} G cached vs {self.flops_uncached / 1e9:.3f} G uncached "
            f"({self.flops_speedup:.2f}x fewer)",
            "tokens computed: "
            + "  ".join(f"{m}={self.token_fraction(m):.1%}" for m in sorted(self.tokens_total)),
            f"cache memory: {self.cache_bytes / 2**20:.2f} MiB peak"
            + (f" (forecast history {self.history_bytes / 2**20:.2f} MiB)" if self.history_bytes else "")
            + (f" on {self.cache_device}" if self.cache_device else "")
            + f" (model weights: {self.weight_bytes / 2**20:.2f} MiB)",
        ]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": self.num_steps,
            "step_counts": self.step_counts,
            "flops": self.flops,
            "flops_uncached": self.flops_uncached,
            "flops_speedup": self.flops_speedup,
            "token_fraction": {m: self.token_fraction(m) for m in sorted(self.tokens_total)},
            "cache_bytes": self.cache_bytes,
            "history_bytes": self.history_bytes,
            "weight_bytes": self.weight_bytes,
            "cache_device": self.cache_device,
        }

    @staticmethod
    def merge(parts: list[CacheStats]) -> CacheStats:
        if len(parts) == 1:
            return parts[0]
        out = CacheStats(step_kinds=list(parts[0].step_kinds) if parts else [])
        if parts:  # properties of the model, not of a branch: the same in every part
            out.weight_bytes, out.cache_device = parts[0].weight_bytes, parts[0].cache_device
        for p in parts:
            out.flops += p.flops
            out.flops_uncached += p.flops_uncached
            out.cache_bytes += p.cache_bytes
            out.history_bytes += p.history_bytes
            out.num_calls += p.num_calls
            out.selection_flops += p.selection_flops
            for m, v in p.tokens_computed.items():
                out.tokens_computed[m] += v
            for m, v in p.tokens_total.items():
                out.tokens_total[m] += v
        return out


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop(query_shape, key_shape, value_shape)


def flop_formulas() -> dict[Any, Any]:
    """FlopCounterMode's per-op formulas (op packet -> fn(*args, out_val=..., **kwargs)), plus CPU fused attention."""
    formulas = dict(flop_registry)
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        formulas[cpu_sdpa] = shape_wrapper(_cpu_sdpa_flop)
    return formulas


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts PyTorch's CPU fused attention kernel.

    Stock FlopCounterMode counts the CUDA SDPA kernels but not
    ``aten._scaled_dot_product_flash_attention_for_cpu``, so on CPU it would miss every
    attention core.
    """
    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = _cpu_sdpa_flop
    return FlopCounterMode(display=False, custom_mapping=mapping)


@contextmanager
def count_flops():
    """``with count_flops() as counter: ...; counter.get_total_flops()``"""
    counter = flop_counter()
    with counter:
        yield counter
