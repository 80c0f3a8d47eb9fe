"""Load the routers the Learning-to-Cache authors published for DiT-XL/2 (``DDIM20_router.pt`` ...).

Format (verified against the authors' repository): ``torch.save`` of a dict whose ``"routers"``
entry is the state dict of a ``ModuleList`` of routers, keys ``"{k}.prob"``, one 1-D tensor of
``2 x depth`` logits per *respaced* DDIM step ``k = 0 .. n-1``; the file also holds the optimizer
state (``"opt"``) and the training arguments (``"args"``, an ``argparse.Namespace``).

* ``k`` is the index into the respaced timesteps in increasing noise order: ``k = n - 1`` is the
  first sampling step (most noise), ``k = 0`` the last. Diffusers call ``s`` (0-based, in sampling
  order) therefore uses router ``k = n - 1 - s``.
* Steps with odd ``k`` are full steps (their caches are refreshed); even ``k`` are cache steps
  (their routers were trained; the odd-``k`` routers are unused). When ``n`` is odd the first call
  (``k = n - 1``, even) has no cache yet and is computed in full.
* Entry ``2 i`` is block ``i``'s attention branch, ``2 i + 1`` its MLP branch (interleaved).
* A branch is computed when ``sigmoid(logit) > threshold`` (the authors use 0.1 for DiT).

The file is a pickle. It is read with ``torch.load(weights_only=True)``, PyTorch's restricted
unpickler that only rebuilds tensors and plain containers, plus one explicitly allowed class,
``argparse.Namespace`` (the stored training arguments, rebuilt as attribute bags). Any other global
in the pickle (e.g. a ``__reduce__`` calling ``os.system``) makes the load fail before it runs.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import pickle
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from ..plan import FULL, CachePlan, StepPlan
from .router import LEARNED, check_logits

_KEY = re.compile(r"^(\d+)\.prob$")
SAFE_GLOBALS = [argparse.Namespace]


def read_router_file(path: str | Path) -> dict[int, torch.Tensor]:
    """The ``{k: logits}`` routers of a published router file, loaded without executing code.

    Every way the file can be wrong (empty, truncated, not a torch file, a pickle with other globals, no
    routers, logits that are NaN / complex / empty / of different sizes) is one ``ValueError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"router file {str(path)!r} does not exist")
    name = f"router file {str(path)!r}"
    if path.stat().st_size == 0:
        raise ValueError(f"{name} is empty; expected a torch checkpoint of '<k>.prob' router logits")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refusing to load {str(path)!r}: it is not a plain tensor checkpoint (the restricted unpickler "
            f"rejected it; nothing in it was executed): {str(err).splitlines()[0] if str(err) else 'unpickling error'}"
        ) from None
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as err:  # truncated / corrupted archives fail in many ways (EOFError, RuntimeError, ...)
        detail = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
        raise ValueError(f"{name} is not a readable torch checkpoint (truncated or corrupted?): {detail}") from None
    if isinstance(data, dict) and "routers" in data:
        data = data["routers"]
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{name} has no 'routers' state dict of '<k>.prob' tensors")
    routers: dict[int, torch.Tensor] = {}
    for key, value in data.items():
        match = _KEY.match(str(key))
        if match is None or not isinstance(value, torch.Tensor) or value.ndim != 1:
            shown = str(key)[:60]
            raise ValueError(f"{name}: unexpected router entry {shown!r}; expected '<k>.prob' 1-D tensors")
        check_logits(value, source=f"{name}, entry {key!r}")
        routers[int(match.group(1))] = value.float()
    if sorted(routers) != list(range(len(routers))):
        shown = sorted(routers)[:10]
        raise ValueError(f"{name}: router indices {shown}{'...' if len(routers) > 10 else ''} are not "
                         f"0..{len(routers) - 1}")
    sizes = sorted({int(v.numel()) for v in routers.values()})
    if len(sizes) != 1 or sizes[0] % 2:
        raise ValueError(f"{name}: routers must all hold 2 x depth logits (attention, MLP per block), got sizes "
                         f"{sizes[:10]}")
    if not all(math.isfinite(float(v.abs().max())) for v in routers.values()):  # float64 -> float32 overflow
        raise ValueError(f"{name}: some logits overflow float32")
    return {k: routers[k] for k in range(len(routers))}


def published_router_plan(
    routers: dict[int, torch.Tensor],
    threshold: float = 0.1,
    modules: Sequence[str] = ("attn1", "ff"),
    metadata: dict | None = None,
) -> CachePlan:
    n = len(routers)
    sizes = {int(v.numel()) for v in routers.values()}
    if len(sizes) != 1 or next(iter(sizes)) % 2:
        raise ValueError(f"routers must all hold 2 x depth logits, got sizes {sorted(sizes)}")
    depth = next(iter(sizes)) // 2
    steps = []
    for s in range(n):
        k = n - 1 - s
        if k % 2 == 1 or s == 0:
            steps.append(StepPlan(FULL, [[1.0, 1.0] for _ in range(depth)], interval=2))
            continue
        on = (torch.sigmoid(routers[k]) > threshold).tolist()
        rows = [[float(on[2 * i]), float(on[2 * i + 1])] for i in range(depth)]
        steps.append(StepPlan(LEARNED, rows, interval=2))
    meta = {
        "num_inference_steps": n,
        "threshold": threshold,
        "timestep_mapping": "diffusers call s uses router k = n - 1 - s; odd k full, even k cache",
        "scheduler": {"class": "DDIMScheduler", "config": {"timestep_spacing": "linspace"}},
        **(metadata or {}),
    }
    return CachePlan(n, depth, tuple(modules), steps, method="l2c-published", metadata=meta)


def load_published_router(
    path: str | Path,
    num_inference_steps: int | None = None,
    depth: int | None = None,
    threshold: float = 0.1,
) -> CachePlan:
    """A plan for diffusers' ``DiTPipeline`` (DDIM, same step count) from an authors' L2C router file.

    ``num_inference_steps`` / ``depth`` are checked against the file when given (DiT-XL/2: depth 28).
    The plan expects ``DDIMScheduler`` with ``timestep_spacing="linspace"``, whose timesteps equal the
    authors' respaced ones (``round(i * 999 / (n - 1))``); see docs/plans.md.
    """
    routers = read_router_file(path)
    n = len(routers)
    if num_inference_steps is not None and num_inference_steps != n:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} does not match the router file, which was trained for "
            f"{n} DDIM steps"
        )
    size = int(routers[0].numel())
    if depth is not None and size != 2 * depth:
        raise ValueError(f"depth={depth} does not match the router file: its routers hold {size} = 2 x {size // 2}")
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return published_router_plan(routers, threshold, metadata={"source": {"file": Path(path).name, "sha256": digest}})
