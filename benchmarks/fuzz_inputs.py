"""Fuzz the strict-input paths: configs, plan files and router files (issue 12).

    python benchmarks/fuzz_inputs.py [--seed 0] [--configs 500] [--plans 200]

Every input must either be accepted exactly as given, or be refused with a ValueError / TypeError (or
FileNotFoundError) that names the field (configs) or the file (plans, routers). Counts per kind:

* handled: refused with a clear error naming the field / file
* accepted: constructed, and the result is exactly what was asked (nothing coerced, all values finite and bounded)
* wrong: accepted with a coerced / invalid value, or refused without naming the field / file
* crashed: any other exception (KeyError, OverflowError, RecursionError, ...)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from dualcache_diffusers.config import DualCacheConfig
from dualcache_diffusers.l2c.published import load_published_router
from dualcache_diffusers.plan import CachePlan, PlanLayout, fora_plan

FIELDS = ["method", "interval", "schedule", "fresh_ratio", "ratio_schedule", "selection", "aggressive",
          "self_attention", "staleness_weight", "spatial_bonus", "spatial_grid", "first_full_steps",
          "num_inference_steps", "seed"]
WORDS = ["duca", "toca", "fora", "full", "plan", "vnorm", "random", "attention", "skip", "reuse", "partial",
         "cycle", "dit-duca", "constant", "dit", "pixart", "pixart-toca", "DUCA", "", "nope"]


def odd_value(rng: random.Random):
    return rng.choice([
        lambda: rng.choice(WORDS), lambda: rng.randint(-5, 20), lambda: rng.choice([2**63, 2**64, 10**400, -(2**70)]),
        lambda: rng.uniform(-1, 2), lambda: rng.choice([math.nan, math.inf, -math.inf, 1e308, -0.0, 5e-324]),
        lambda: rng.choice([True, False, None]), lambda: np.int64(rng.randint(-3, 50)),
        lambda: np.float32(rng.uniform(-0.5, 1.5)), lambda: np.array([rng.random()]),
        lambda: np.array(rng.choice(WORDS)), lambda: [rng.randint(0, 3)], lambda: {"a": 1}, lambda: str(rng.random()),
        lambda: np.bool_(rng.random() < 0.5), lambda: np.uint64(2**64 - 1), lambda: complex(0.1, 0.0),
    ])()


def fuzz_configs(rng: random.Random, count: int, counts: Counter, examples: dict) -> None:
    for _ in range(count):
        fields = {name: odd_value(rng) for name in rng.sample(FIELDS, rng.randint(1, 4))}
        try:
            config = DualCacheConfig(**fields)
        except (ValueError, TypeError) as error:
            ok = any(name in str(error) for name in fields)
            counts["configs " + ("handled" if ok else "wrong")] += 1
            if not ok:
                examples.setdefault("configs wrong", repr((fields, error)))
            continue
        except Exception as error:
            counts["configs crashed"] += 1
            examples.setdefault("configs crashed", repr((fields, error)))
            continue
        values = config.to_dict()
        good = all(type(v) in (int, float, str, type(None)) for v in values.values())
        good &= all(math.isfinite(v) for v in values.values() if isinstance(v, float))
        good &= 0 <= config.fresh_ratio <= 1 and 1 <= config.interval <= 1000 and 0 <= config.seed < 2**63
        try:
            config.build_plan(8, PlanLayout.uniform_layout(2, ("attn1", "ff")))
        except Exception as error:
            good = False
            examples.setdefault("configs wrong", repr((fields, error)))
        counts["configs " + ("accepted" if good else "wrong")] += 1


def _locations(data, prefix=()):
    if isinstance(data, dict):
        for key, value in data.items():
            yield (*prefix, key)
            yield from _locations(value, (*prefix, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield (*prefix, i)
            yield from _locations(value, (*prefix, i))


PLAN_VALUES = [None, True, False, 0, 1, -1, 0.5, 2, 8.5, "0.5", "false", "true", "", [], {}, [[1]], 10**30,
               "Infinity", "NaN", 1e999]


def plan_texts(rng: random.Random, count: int):
    valid = fora_plan(6, 2, ("attn1", "ff")).to_dict()
    locations = list(_locations(valid))
    fixed = ["", " ", "null", "[]", "[1, 2]", '"plan"', "3", "{", "{}", '{"format": "dualcache-plan"}',
             "\xff\xfe", "{" * 50_000, '{"metadata": ' + "[" * 100_000 + "]" * 100_000 + "}",
             '{"format": "dualcache-plan", "version": ' + "9" * 5000 + "}"]
    for text in fixed:
        yield text
    for _ in range(count - len(fixed)):
        data = copy.deepcopy(valid)
        for _ in range(rng.randint(1, 3)):
            location = rng.choice(locations)
            parent = data
            try:
                for key in location[:-1]:
                    parent = parent[key]
                if rng.random() < 0.2 and isinstance(parent, dict):
                    parent.pop(location[-1], None)
                elif rng.random() < 0.1 and isinstance(parent, dict):
                    parent["extra_" + str(rng.randint(0, 9))] = 1
                else:
                    parent[location[-1]] = rng.choice(PLAN_VALUES)
            except (KeyError, IndexError, TypeError):
                pass
        text = json.dumps(data)
        if rng.random() < 0.3:  # non-JSON constants in place of a number
            text = text.replace("1.0", rng.choice(["NaN", "Infinity", "-Infinity", "1e999"]), 1)
        yield text


def load_or_count(kind: str, load, path: Path, shown: str, counts: Counter, examples: dict):
    """``load(path)``; a refusal is counted as handled when its message names the file, else as wrong; any
    other exception as crashed. Returns what was loaded, or None when refused."""
    try:
        return load(path)
    except (ValueError, TypeError, FileNotFoundError) as error:
        ok = path.name in str(error)
        counts[f"{kind} " + ("handled" if ok else "wrong")] += 1
        if not ok:
            examples.setdefault(f"{kind} wrong", f"{shown!r}: {error!r}")
    except Exception as error:
        counts[f"{kind} crashed"] += 1
        examples.setdefault(f"{kind} crashed", f"{shown!r}: {type(error).__name__}: {str(error)[:100]}")
    return None


def fuzz_plans(rng: random.Random, count: int, directory: Path, counts: Counter, examples: dict) -> None:
    for i, text in enumerate(plan_texts(rng, count)):
        path = directory / f"plan_{i}.json"
        path.write_bytes(text.encode("utf-8", "surrogateescape") if text != "\xff\xfe" else b"\xff\xfe")
        plan = load_or_count("plans", CachePlan.from_json, path, text[:80], counts, examples)
        if plan is None:
            continue
        raw = json.loads(text)
        good = isinstance(raw["num_steps"], int) and not isinstance(raw["num_steps"], bool)
        for step, raw_step in zip(plan.steps, raw["steps"]):
            good &= step.skip_blocks is raw_step.get("skip_blocks", False)
            good &= step.interval == raw_step.get("interval", 1) and type(step.interval) is int
            for row, raw_row in zip(step.fractions, raw_step["fractions"]):
                good &= all(not isinstance(g, bool) and isinstance(g, (int, float)) and math.isfinite(g) and f == g
                            for f, g in zip(row, raw_row))
        counts["plans " + ("accepted" if good else "wrong")] += 1
        if not good:
            examples.setdefault("plans wrong", f"{text[:120]!r} accepted")


def router_files(directory: Path) -> list[Path]:
    import argparse as ap
    import os
    import pickle

    def save(name, obj):
        path = directory / name
        torch.save(obj, path)
        return path

    good = save("good.pt", {"routers": {f"{k}.prob": torch.zeros(8) for k in range(4)}, "args": ap.Namespace(x=1)})
    raw = good.read_bytes()
    files = [good]
    for cut in (0, 1, 10, 100, len(raw) // 3, len(raw) // 2, len(raw) - 20, len(raw) - 1):
        path = directory / f"cut_{cut}.pt"
        path.write_bytes(raw[:cut])
        files.append(path)
    rng = random.Random(1)
    for i in range(6):  # flipped bytes
        data = bytearray(raw)
        for _ in range(8):
            data[rng.randrange(len(data))] = rng.randrange(256)
        path = directory / f"flip_{i}.pt"
        path.write_bytes(bytes(data))
        files.append(path)

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    (directory / "text.pt").write_text("not a checkpoint\n")
    (directory / "pickle.pt").write_bytes(pickle.dumps({"routers": {"0.prob": [0.0] * 8}}))
    (directory / "evil.pt").write_bytes(pickle.dumps({"routers": {"0.prob": torch.zeros(8)}, "x": Payload()}))
    files += [directory / "text.pt", directory / "pickle.pt", directory / "evil.pt"]
    tensors = {
        "nan": torch.full((8,), math.nan), "inf": torch.tensor([math.inf] * 8),
        "complex": torch.zeros(8, dtype=torch.cfloat),
        "empty": torch.zeros(0), "int": torch.zeros(8, dtype=torch.int64), "bool": torch.zeros(8, dtype=torch.bool),
        "2d": torch.zeros(2, 4), "odd": torch.zeros(7), "scalar": torch.tensor(1.0), "half": torch.zeros(8).half(),
        "f64big": torch.full((8,), 1e300, dtype=torch.float64),
    }
    for name, tensor in tensors.items():
        files.append(save(f"t_{name}.pt", {"routers": {"0.prob": tensor, "1.prob": torch.zeros(8)}}))
    files.append(save("mixed.pt", {"routers": {"0.prob": torch.zeros(8), "1.prob": torch.zeros(6)}}))
    files.append(save("gap.pt", {"routers": {"0.prob": torch.zeros(8), "2.prob": torch.zeros(8)}}))
    files.append(save("badkey.pt", {"routers": {"zero.prob": torch.zeros(8)}}))
    files.append(save("list.pt", [torch.zeros(8)]))
    files.append(save("emptydict.pt", {}))
    files.append(save("tensor.pt", torch.zeros(8)))
    files.append(save("negkey.pt", {"routers": {"-1.prob": torch.zeros(8)}}))
    return files


def fuzz_routers(directory: Path, counts: Counter, examples: dict) -> None:
    for path in router_files(directory):
        plan = load_or_count("router files", load_published_router, path, path.name, counts, examples)
        if plan is None:
            continue
        counts["router files " + ("accepted" if plan.steps[0].is_full else "wrong")] += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--configs", type=int, default=500, help="configs to try (default: 500)")
    parser.add_argument("--plans", type=int, default=200, help="plan files to try (default: 200)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    counts: Counter = Counter()
    examples: dict[str, str] = {}
    warnings.simplefilter("ignore")
    fuzz_configs(rng, args.configs, counts, examples)
    with tempfile.TemporaryDirectory() as tmp:
        fuzz_plans(rng, args.plans, Path(tmp), counts, examples)
        fuzz_routers(Path(tmp), counts, examples)
    print("| input | tried | handled (clear error) | accepted | wrong | crashed |")
    print("|---|---|---|---|---|---|")
    bad = 0
    for kind in ("configs", "plans", "router files"):
        row = [counts[f"{kind} {what}"] for what in ("handled", "accepted", "wrong", "crashed")]
        bad += row[2] + row[3]
        print(f"| {kind} | {sum(row)} | " + " | ".join(map(str, row)) + " |")
    for key, text in examples.items():
        print(f"example ({key}): {text}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
