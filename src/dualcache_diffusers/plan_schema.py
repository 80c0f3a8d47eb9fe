"""The plan file format, checked field by field before a :class:`~dualcache_diffusers.plan.CachePlan` is built.

A plan file is JSON::

    {"format": "dualcache-plan", "version": 1 | 2 | 3 | 4, "method": str,
     "num_steps": int >= 1, "num_blocks": int >= 1,
     "modules": [str, ...]                      (non-empty, unique),
     "metadata": {...}                          (optional, any JSON object),
     "block_modules": [[str, ...] x num_blocks] (optional, version 2: the modules present in each block,
                                                 each a subset of "modules"; absent = every module everywhere),
     "block_names": [str x num_blocks]          (optional, version 2),
     "steps": [{"kind": str,
                "skip_blocks": bool              (optional, default false),
                "skip_call": bool                (optional, version 4, default false: the denoiser is not run,
                                                 its output forecast from its full calls'),
                "interval": int >= 1             (optional, default 1),
                "forecast_order": int in [0, 4]  (optional, default 0),
                "forecast_weights": [number x 2..5] (optional, version 3: learned forecast weights of the last
                                                 2..5 stored full computations, oldest first, each finite with
                                                 |w| <= 1000; needs forecast_order >= 1),
                "fractions": [[number in [0, 1] x len(modules)] x num_blocks]} x num_steps]}

Nothing is coerced: ``"false"`` is not a bool, ``"0.5"`` and ``true`` are not numbers, ``8.5`` is not an
integer, and NaN / Infinity are refused. Every error is a ``ValueError`` (bad value) or ``TypeError``
(wrong JSON type) whose message names the file (``source``) and the field path, e.g.
``steps[3].fractions[2][1]``.
"""

from __future__ import annotations

import json
import math
from typing import Any

PLAN_FORMAT = "dualcache-plan"
SUPPORTED_VERSIONS = (1, 2, 3, 4)
TOP_LEVEL_KEYS = frozenset(
    {"format", "version", "method", "num_steps", "num_blocks", "modules", "metadata", "block_modules",
     "block_names", "steps"}
)
REQUIRED_KEYS = ("format", "version", "method", "num_steps", "num_blocks", "modules", "steps")
STEP_KEYS = frozenset({"kind", "skip_blocks", "skip_call", "interval", "fractions", "forecast_order",
                       "forecast_weights"})
VERSION_2_KEYS = ("block_modules", "block_names")
VERSION_3_STEP_KEYS = ("forecast_weights",)

# Bounds that keep a file from asking for absurd work or memory (a plan for 10**18 steps, say).
MAX_STEPS = 100_000
MAX_BLOCKS = 10_000
MAX_MODULES = 256
MAX_INTERVAL = 100_000
MAX_FORECAST_ORDER = 4
MAX_FORECAST_WEIGHT = 1000.0  # a learned forecast weight (order-4 Lagrange weights 3 spacings ahead reach 126)
MAX_NAME_LENGTH = 256
MAX_METADATA_DEPTH = 32


class _PlanError:
    """Builds messages that name the file and the field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def value(self, path: str, message: str) -> ValueError:
        return ValueError(f"plan {self.source}: {path}: {message}")

    def type(self, path: str, value: Any, expected: str) -> TypeError:
        return TypeError(f"plan {self.source}: {path} must be {expected}, got {_describe(value)}")


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {json.dumps(value)}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {shown!r}"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        text = repr(value)
        return f"the number {text if len(text) <= 40 else text[:37] + '...'}"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "an array"
    return f"a {type(value).__name__}"


def _int(err: _PlanError, path: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise err.type(path, value, f"an integer in [{low}, {high}]")
    if not low <= value <= high:
        shown = value if abs(value) < 10**40 else "a huge integer"
        raise err.value(path, f"{shown} is out of range; allowed: an integer in [{low}, {high}]")
    return value


def _str(err: _PlanError, path: str, value: Any, nonempty: bool = False) -> str:
    if not isinstance(value, str):
        raise err.type(path, value, "a string")
    if nonempty and not value:
        raise err.value(path, "must not be empty")
    if len(value) > MAX_NAME_LENGTH:
        raise err.value(path, f"is {len(value)} characters long; allowed: at most {MAX_NAME_LENGTH}")
    return value


def _list(err: _PlanError, path: str, value: Any, length: int | None = None, what: str = "") -> list:
    if not isinstance(value, list):
        raise err.type(path, value, "an array" + (f" of {what}" if what else ""))
    if length is not None and len(value) != length:
        raise err.value(path, f"has {len(value)} entries, expected {length}" + (f" ({what})" if what else ""))
    return value


def _fraction(err: _PlanError, path: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise err.type(path, value, "a number in [0, 1]")
    if isinstance(value, float) and not math.isfinite(value):
        raise err.value(path, f"{value!r} is not a finite number; allowed: a number in [0, 1]")
    if not 0 <= value <= 1:
        shown = value if not isinstance(value, int) or abs(value) < 10**40 else "a huge integer"
        raise err.value(path, f"fraction {shown} is outside [0, 1]")
    return float(value)


def _forecast_weights(err: _PlanError, path: str, value: Any, order: int, version: int) -> None:
    if version < 3:
        raise err.value(path, f"needs plan format version 3 (the file says version {version})")
    weights = _list(err, path, value, what="numbers")
    if not 2 <= len(weights) <= MAX_FORECAST_ORDER + 1:
        raise err.value(path, f"has {len(weights)} entries; allowed: 2 to {MAX_FORECAST_ORDER + 1} (one weight per "
                              "stored full computation, oldest first)")
    for j, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise err.type(f"{path}[{j}]", w, f"a number in [-{MAX_FORECAST_WEIGHT:g}, {MAX_FORECAST_WEIGHT:g}]")
        if not math.isfinite(w) or abs(w) > MAX_FORECAST_WEIGHT:
            shown = w if not isinstance(w, int) or abs(w) < 10**40 else "a huge integer"
            raise err.value(f"{path}[{j}]", f"{shown} is not a finite number in [-{MAX_FORECAST_WEIGHT:g}, "
                                            f"{MAX_FORECAST_WEIGHT:g}]")
    if order < 1:
        raise err.value(path, "needs forecast_order >= 1 in the same step (the Lagrange forecast used while fewer "
                              "full computations are stored)")


def _check_json_value(err: _PlanError, path: str, value: Any, depth: int = 0) -> None:
    """Metadata: any JSON value (finite numbers, string keys), nested at most MAX_METADATA_DEPTH deep."""
    if depth > MAX_METADATA_DEPTH:
        raise err.value(path, f"is nested more than {MAX_METADATA_DEPTH} levels deep")
    if value is None or isinstance(value, (str, bool)):
        return
    if isinstance(value, int):
        if abs(value) >= 2**63:
            raise err.value(path, "integer out of range; allowed: |value| < 2**63")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise err.value(path, f"{value!r} is not a finite number (NaN and Infinity are not JSON)")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise err.type(f"{path} key", key, "a string")
            _check_json_value(err, f"{path}.{key}", item, depth + 1)
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_json_value(err, f"{path}[{i}]", item, depth + 1)
        return
    raise err.type(path, value, "a JSON value (object, array, string, number, boolean or null)")


def validate_plan_dict(data: Any, source: str = "<dict>") -> None:
    """Raise ``ValueError`` / ``TypeError`` naming ``source`` and the field if ``data`` is not a valid plan.

    ``data`` is the parsed JSON (see the module docstring for the format). Returns None when it is valid;
    a valid dict is then safe to hand to ``CachePlan.from_dict`` without any conversion.
    """
    err = _PlanError(source)
    if not isinstance(data, dict):
        raise err.type("top level", data, "a JSON object (a dualcache plan)")
    if data.get("format") != PLAN_FORMAT:
        raise err.value(
            "format", f"not a dualcache plan: the JSON has no 'format': '{PLAN_FORMAT}' entry "
            f"(got {_describe(data.get('format')) if 'format' in data else 'no format key'})"
        )
    unknown = sorted(str(k) for k in data if k not in TOP_LEVEL_KEYS)
    if unknown:
        raise err.value("top level", f"unknown key(s) {unknown}; allowed: {', '.join(sorted(TOP_LEVEL_KEYS))}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise err.value("top level", f"missing key(s) {missing}; required: {', '.join(REQUIRED_KEYS)}")

    version = data["version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise err.type("version", version, f"an integer ({' or '.join(map(str, SUPPORTED_VERSIONS))})")
    if version not in SUPPORTED_VERSIONS:
        if version > max(SUPPORTED_VERSIONS):
            raise err.value("version", f"plan format version {version} is newer than this library supports "
                                       f"({max(SUPPORTED_VERSIONS)})")
        raise err.value("version", f"{version} is not a plan format version; allowed: {SUPPORTED_VERSIONS}")
    _str(err, "method", data["method"])
    num_steps = _int(err, "num_steps", data["num_steps"], 1, MAX_STEPS)
    num_blocks = _int(err, "num_blocks", data["num_blocks"], 1, MAX_BLOCKS)

    modules = _list(err, "modules", data["modules"], what="module names")
    if not modules:
        raise err.value("modules", "must name at least one module")
    if len(modules) > MAX_MODULES:
        raise err.value("modules", f"has {len(modules)} entries; allowed: at most {MAX_MODULES}")
    for i, name in enumerate(modules):
        _str(err, f"modules[{i}]", name, nonempty=True)
    duplicates = sorted({m for m in modules if modules.count(m) > 1})
    if duplicates:
        raise err.value("modules", f"module names must be unique; repeated: {duplicates}")

    if "metadata" in data:
        if not isinstance(data["metadata"], dict):
            raise err.type("metadata", data["metadata"], "a JSON object")
        _check_json_value(err, "metadata", data["metadata"])

    for key in VERSION_2_KEYS:
        if key in data and version < 2:
            raise err.value(key, f"needs plan format version 2 (the file says version {version})")
    if "block_modules" in data:
        rows = _list(err, "block_modules", data["block_modules"], num_blocks, "one list of module names per block")
        known = set(modules)
        for b, row in enumerate(rows):
            _list(err, f"block_modules[{b}]", row, what="module names")
            for m, name in enumerate(row):
                _str(err, f"block_modules[{b}][{m}]", name, nonempty=True)
                if name not in known:
                    raise err.value(f"block_modules[{b}][{m}]", f"{name!r} is not one of modules {modules}")
            if len(set(row)) != len(row):
                raise err.value(f"block_modules[{b}]", "names a module twice")
    if "block_names" in data:
        names = _list(err, "block_names", data["block_names"], num_blocks, "one name per block")
        for b, name in enumerate(names):
            _str(err, f"block_names[{b}]", name)

    steps = _list(err, "steps", data["steps"], what="steps")
    if len(steps) != num_steps:
        raise err.value("steps", f"plan has {len(steps)} steps but num_steps={num_steps}")
    for i, step in enumerate(steps):
        _validate_step(err, f"steps[{i}]", step, num_blocks, len(modules), version)
    first = steps[0]
    if (first.get("skip_blocks", False) or first.get("skip_call", False)
            or any(f < 1 for row in first["fractions"] for f in row)):
        raise err.value("steps[0]", "the first step of a plan must be a full step (every fraction 1, "
                                    "skip_blocks and skip_call false): the caches start empty")


def _validate_step(err: _PlanError, path: str, step: Any, num_blocks: int, num_modules: int, version: int) -> None:
    if not isinstance(step, dict):
        raise err.type(path, step, "a JSON object")
    unknown = sorted(str(k) for k in step if k not in STEP_KEYS)
    if unknown:
        raise err.value(path, f"unknown key(s) {unknown}; allowed: {', '.join(sorted(STEP_KEYS))}")
    for key in ("kind", "fractions"):
        if key not in step:
            raise err.value(path, f"missing key {key!r}")
    _str(err, f"{path}.kind", step["kind"])
    if "skip_blocks" in step and not isinstance(step["skip_blocks"], bool):
        raise err.type(f"{path}.skip_blocks", step["skip_blocks"], "true or false")
    if "skip_call" in step:
        if not isinstance(step["skip_call"], bool):
            raise err.type(f"{path}.skip_call", step["skip_call"], "true or false")
        if version < 4:
            raise err.value(f"{path}.skip_call", f"needs plan format version 4 (the file says version {version})")
    if "interval" in step:
        _int(err, f"{path}.interval", step["interval"], 1, MAX_INTERVAL)
    if "forecast_order" in step:
        _int(err, f"{path}.forecast_order", step["forecast_order"], 0, MAX_FORECAST_ORDER)
    if "forecast_weights" in step:
        _forecast_weights(err, f"{path}.forecast_weights", step["forecast_weights"], step.get("forecast_order", 0),
                          version)
    rows = step["fractions"]
    if not isinstance(rows, list):
        raise err.type(f"{path}.fractions", rows, "an array of one row per block")
    if len(rows) != num_blocks:
        raise err.value(f"{path}.fractions", f"has {len(rows)} blocks, expected num_blocks={num_blocks}")
    for b, row in enumerate(rows):
        if not isinstance(row, list):
            raise err.type(f"{path}.fractions[{b}]", row, "an array of one fraction per module")
        if len(row) != num_modules:
            raise err.value(f"{path}.fractions[{b}]",
                            f"has {len(row)} fractions, expected one per module ({num_modules})")
        for m, value in enumerate(row):
            _fraction(err, f"{path}.fractions[{b}][{m}]", value)


def _constant(name: str) -> float:
    # NaN / Infinity / -Infinity are not JSON; they parse to floats here only so that the schema can name
    # the field that holds them (every non-finite number is rejected there).
    return float(name)


def loads_plan_json(text: str, source: str) -> Any:
    """``json.loads`` with errors naming ``source``; NaN, Infinity and overflowing numbers (``1e999``) parse to
    non-finite floats that :func:`validate_plan_dict` then rejects, naming their field."""
    if not text.strip():
        raise ValueError(f"plan {source}: the file is empty (expected a JSON object, a dualcache plan)")
    try:
        return json.loads(text, parse_constant=_constant)
    except RecursionError:
        raise ValueError(f"plan {source}: the JSON is nested too deeply to be a plan") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"plan {source}: not valid JSON: {error}") from None
    except ValueError as error:  # e.g. an integer literal beyond Python's digit limit
        raise ValueError(f"plan {source}: not a valid plan JSON: {error}") from None


__all__ = ["PLAN_FORMAT", "SUPPORTED_VERSIONS", "loads_plan_json", "validate_plan_dict"]
