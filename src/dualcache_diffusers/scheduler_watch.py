"""Which scheduler started this thread's generation: ``set_timesteps`` observed on the scheduler classes.

A pipeline starts every generation by giving its scheduler new timesteps. The engine needs to know when
that happens and which scheduler it was, in the calling thread: the pipeline it was enabled on may have
had its scheduler replaced, or the transformer may be shared with pipelines the engine never saw
(``Pipeline.from_pipe(pipe, scheduler=...)``, the server pattern diffusers documents). Watching the
scheduler *classes* covers all of them: while any engine is attached, ``set_timesteps`` of every
diffusers scheduler class (and of any other class the engine meets) records, per thread, the scheduler
and how many times it was given timesteps. Detaching the last engine restores the classes exactly.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any

from diffusers.schedulers.scheduling_utils import SchedulerMixin

_local = threading.local()  # .latest: weakref to the scheduler last given timesteps; .epochs: {id: count}
_lock = threading.Lock()
_users = 0
_patched: dict[type, Any] = {}  # class -> its own set_timesteps before patching
_init_subclass_before: Any = None


def latest() -> Any | None:
    """The scheduler most recently given timesteps in this thread (None if none is alive)."""
    ref = getattr(_local, "latest", None)
    return ref() if ref is not None else None


def epoch(scheduler: Any) -> int:
    """How many times ``scheduler`` was given timesteps in this thread."""
    return getattr(_local, "epochs", {}).get(id(scheduler), 0)


def _note(scheduler: Any) -> None:
    epochs = getattr(_local, "epochs", None)
    if epochs is None:
        epochs = _local.epochs = {}
    epochs[id(scheduler)] = epochs.get(id(scheduler), 0) + 1
    try:
        _local.latest = weakref.ref(scheduler)
    except TypeError:  # an object without weakref support: keep it alive instead
        _local.latest = lambda: scheduler


def watch_class(cls: type) -> None:
    """Record ``set_timesteps`` calls of ``cls`` (and its subclasses) while an engine is attached."""
    with _lock:
        if _users and "set_timesteps" in vars(cls) and cls not in _patched:
            _patch(cls)


def _patch(cls: type) -> None:
    original = vars(cls)["set_timesteps"]

    @functools.wraps(original)
    def set_timesteps(self, *args: Any, **kwargs: Any):
        _note(self)
        return original(self, *args, **kwargs)

    _patched[cls] = original
    cls.set_timesteps = set_timesteps


def _subclasses(cls: type):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def start() -> None:
    """One more engine attached: patch every loaded scheduler class, and classes loaded later."""
    global _users, _init_subclass_before
    with _lock:
        _users += 1
        if _users > 1:
            return
        for cls in {SchedulerMixin, *_subclasses(SchedulerMixin)}:
            if "set_timesteps" in vars(cls):
                _patch(cls)
        _init_subclass_before = vars(SchedulerMixin).get("__init_subclass__")

        def init_subclass(cls, **kwargs: Any) -> None:
            super(SchedulerMixin, cls).__init_subclass__(**kwargs)
            with _lock:
                if _users and "set_timesteps" in vars(cls):
                    _patch(cls)

        SchedulerMixin.__init_subclass__ = classmethod(init_subclass)


def stop() -> None:
    """One engine detached; the last one restores every class."""
    global _users
    with _lock:
        _users = max(_users - 1, 0)
        if _users:
            return
        for cls, original in _patched.items():
            cls.set_timesteps = original
        _patched.clear()
        if _init_subclass_before is None:
            del SchedulerMixin.__init_subclass__
        else:
            SchedulerMixin.__init_subclass__ = _init_subclass_before
