"""Where cached features live: on the model's device (default) or offloaded (``cache_device="cpu"``).

The engine keeps every cached feature (module outputs, the block stack's output, forecast history) as
a *stored* value: a tensor or a (nested) tuple of tensors / None. :class:`CacheStorage` turns a
module's output into its stored form (:meth:`put`) and a stored value back into one on the model's
device (:meth:`get`). With ``cache_device=None`` both are the identity, so the default path costs
nothing and the engine's tensors are the cache itself.

Offloading to the CPU from a CUDA model:

* ``put`` copies into pinned host memory on a side CUDA stream (``non_blocking``) that first waits
  for the compute stream, so the copy overlaps the rest of the step; the source tensor is marked as
  used by that stream so the allocator does not hand its memory out before the copy is done.
* ``prefetch`` starts the copies back to the device on the same side stream and records an event;
  the engine calls it one block ahead within a step, and at the end of a call for the first block (or
  the block stack) of the next step when the plan says that step reads the cache.
* ``get`` takes a prefetched copy (the compute stream waits for its event) or, when none was
  started, copies now the same way. Copies back are fresh device tensors: the stored value is never
  changed in place (the engine stores a partially recomputed cache again).

Host to host (a CPU model) and other device pairs fall back to plain ``Tensor.to`` copies, in stream
order: on a CPU model with ``cache_device="cpu"`` nothing is copied at all.
"""

from __future__ import annotations

from typing import Any

import torch

#: a prefetched copy: (the stored value it came from, the copy on the device, the copy's CUDA event or None)
Prefetched = tuple[Any, Any, Any]


class CacheStorage:
    """Stores cached features on ``device`` (``None``: where they were computed).

    ``copy_always`` makes every put / get a real copy even where the devices agree; it lets the
    offloading path (bookkeeping, prefetch, in-place updates) be tested on a CPU-only machine.
    """

    def __init__(self, device: str | torch.device | None, copy_always: bool = False) -> None:
        self.device = torch.device(device) if device is not None else None
        self.copy_always = copy_always
        self._streams: dict[torch.device, Any] = {}

    @property
    def offloads(self) -> bool:
        """Whether stored values may differ from the computed ones (False: the default, identity path)."""
        return self.device is not None

    def offloads_from(self, device: str | torch.device) -> bool:
        """Whether values computed on ``device`` are stored elsewhere (False: ``cache_device`` is the model's
        own device, as ``"cpu"`` is on a CPU model, and storing, loading and prefetching are the identity)."""
        return self.device is not None and self._moves(torch.device(device), self.device)

    # ---- storing --------------------------------------------------------------------------------
    def put(self, value: Any) -> Any:
        """``value`` in its stored form (itself when nothing is offloaded)."""
        if self.device is None:
            return value
        return _map(value, self._put_tensor)

    def _put_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        target = self.device
        if not self._moves(tensor.device, target):
            return tensor
        tensor = tensor.detach()
        if tensor.device.type == "cuda" and target.type == "cpu":
            stream = self._stream(tensor.device)
            stored = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the output is ready
            with torch.cuda.stream(stream):
                stored.copy_(tensor, non_blocking=True)
            tensor.record_stream(stream)  # its memory is not reused before the copy has read it
            return stored
        return tensor.to(target, copy=True)

    # ---- loading --------------------------------------------------------------------------------
    def prefetch(self, prefetched: dict[int, Prefetched], stored: Any, device: torch.device) -> None:
        """Start copying ``stored`` to ``device``; :meth:`get` picks the copy up (nothing when not offloading)."""
        if self.device is None:
            return
        for tensor in _tensors(stored):
            entry = prefetched.get(id(tensor))
            if entry is None or entry[0] is not tensor:
                prefetched[id(tensor)] = (tensor, *self._copy_back(tensor, device))

    def get(self, prefetched: dict[int, Prefetched], stored: Any, device: torch.device) -> Any:
        """``stored`` on ``device``: a prefetched copy if one was started, else a copy made now."""
        if self.device is None:
            return stored
        return _map(stored, lambda tensor: self._get_tensor(prefetched, tensor, device))

    def _get_tensor(self, prefetched: dict[int, Prefetched], tensor: torch.Tensor, device: torch.device):
        entry = prefetched.pop(id(tensor), None)
        if entry is None or entry[0] is not tensor:
            entry = (tensor, *self._copy_back(tensor, device))
        _, loaded, event = entry
        if event is not None:
            current = torch.cuda.current_stream(loaded.device)
            current.wait_event(event)
            loaded.record_stream(current)  # allocated on the side stream, used on the compute stream
        return loaded

    def _copy_back(self, tensor: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, Any]:
        device = torch.device(device)
        if not self._moves(tensor.device, device):
            return tensor, None
        if device.type == "cuda" and tensor.device.type == "cpu":
            stream = self._stream(device)
            with torch.cuda.stream(stream):
                loaded = tensor.to(device, non_blocking=tensor.is_pinned())
                event = torch.cuda.Event()
                event.record(stream)
            return loaded, event
        return tensor.to(device, copy=True), None

    # ---- helpers --------------------------------------------------------------------------------
    def _moves(self, source: torch.device, target: torch.device) -> bool:
        return self.copy_always or not _same_device(source, target)

    def _stream(self, device: torch.device) -> Any:
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        return stream


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:  # "cuda" means the current CUDA device
        current = torch.cuda.current_device() if a.type == "cuda" else 0
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index


def _map(value: Any, fn) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map(item, fn) for item in value)
    return value


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []
