"""Strict inputs (issue 12, items 5-7): plan files, config values and router / checkpoint files either load
exactly as written or fail with one ValueError / TypeError that names the file and the field."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dualcache_diffusers.config import DualCacheConfig
from dualcache_diffusers.plan import CachePlan, PlanLayout, fora_plan
from dualcache_diffusers.plan_schema import validate_plan_dict

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_PLANS = sorted((ROOT / "docs" / "results" / "plans").glob("*.json"))
MODULES = ("attn1", "ff")


def _valid() -> dict:
    return fora_plan(4, 2, MODULES).to_dict()


def _write(tmp_path: Path, data, name: str = "plan.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# ------------------------------------------------------------------------------------------------ plans


@pytest.mark.parametrize("path", SHIPPED_PLANS, ids=lambda p: p.name)
def test_shipped_plans_still_load(path):
    plan = CachePlan.from_json(path)
    assert plan.num_steps == 20 and plan.steps[0].is_full


def test_shipped_plans_exist():
    assert {p.stem for p in SHIPPED_PLANS} >= {"l2c_dit_2x", "l2c_dit_2.5x", "dual_dit_2x", "dual_dit_2.5x",
                                                "l2c_forecast_dit_2x", "l2c_forecast_dit_2.5x"}


@pytest.mark.parametrize(
    "mutate, error, field",
    [
        # each of these was coerced or crashed with another exception before the schema
        (lambda d: d["steps"][1].update(skip_blocks="false"), TypeError, "steps[1].skip_blocks"),
        (lambda d: d["steps"][1].update(skip_blocks=0), TypeError, "steps[1].skip_blocks"),
        (lambda d: d["steps"][1]["fractions"][1].__setitem__(1, "0.5"), TypeError, "steps[1].fractions[1][1]"),
        (lambda d: d["steps"][1]["fractions"][1].__setitem__(0, True), TypeError, "steps[1].fractions[1][0]"),
        (lambda d: d["steps"][2]["fractions"][0].__setitem__(1, None), TypeError, "steps[2].fractions[0][1]"),
        (lambda d: d["steps"][3]["fractions"][1].__setitem__(1, 2), ValueError, "steps[3].fractions[1][1]"),
        (lambda d: d.update(num_steps=8.5), TypeError, "num_steps"),
        (lambda d: d.update(num_steps="4"), TypeError, "num_steps"),
        (lambda d: d.update(num_blocks=True), TypeError, "num_blocks"),
        (lambda d: d.update(num_steps=10**30), ValueError, "num_steps"),
        (lambda d: d.update(version="1"), TypeError, "version"),
        (lambda d: d.update(version=99), ValueError, "version"),
        (lambda d: d.pop("steps"), ValueError, "missing key(s) ['steps']"),
        (lambda d: d.pop("num_blocks"), ValueError, "missing key(s) ['num_blocks']"),
        (lambda d: d.update(colour="red"), ValueError, "unknown key(s) ['colour']"),
        (lambda d: d["steps"][1].update(colour="red"), ValueError, "steps[1]: unknown key(s) ['colour']"),
        (lambda d: d["steps"][1].pop("kind"), ValueError, "steps[1]: missing key 'kind'"),
        (lambda d: d["steps"][1].update(kind=3), TypeError, "steps[1].kind"),
        (lambda d: d["steps"][1].update(interval=0), ValueError, "steps[1].interval"),
        (lambda d: d["steps"][1].update(interval=2.0), TypeError, "steps[1].interval"),
        (lambda d: d["steps"][1].update(forecast_order=5), ValueError, "steps[1].forecast_order"),
        (lambda d: d.update(modules="attn1"), TypeError, "modules"),
        (lambda d: d.update(modules=[]), ValueError, "modules"),
        (lambda d: d.update(modules=["attn1", "attn1"]), ValueError, "unique"),
        (lambda d: d.update(modules=["attn1", 7]), TypeError, "modules[1]"),
        (lambda d: d.update(metadata=[1]), TypeError, "metadata"),
        (lambda d: d.update(metadata={"x": float("inf")}), ValueError, "metadata.x"),
        (lambda d: d.update(method=None), TypeError, "method"),
        (lambda d: d.update(steps={"0": {}}), TypeError, "steps"),
        (lambda d: d["steps"].__setitem__(2, "full"), TypeError, "steps[2]"),
        (lambda d: d["steps"][2].update(fractions="all"), TypeError, "steps[2].fractions"),
        (lambda d: d["steps"][2]["fractions"].__setitem__(0, 1.0), TypeError, "steps[2].fractions[0]"),
        (lambda d: d.update(block_names=["a", "b"]), ValueError, "block_names"),  # version 1 has none
        (lambda d: d["steps"][0].update(skip_blocks=True), ValueError, "steps[0]"),
    ],
)
def test_bad_plan_files_name_the_file_and_field(tmp_path, mutate, error, field):
    data = _valid()
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(error) as info:
        CachePlan.from_json(path)
    assert str(path) in str(info.value)
    assert field in str(info.value)


def test_non_object_top_level(tmp_path):
    for text in ("[1, 2]", '"a plan"', "3", "null"):
        path = _write(tmp_path, text)
        with pytest.raises(TypeError, match=r"plan\.json.*top level must be a JSON object"):
            CachePlan.from_json(path)


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("{not json", "not valid JSON"),
        ('{"format": "dualcache-plan", "x": ' + "9" * 5000 + "}", "not a valid plan JSON"),
        ('{"metadata": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ],
)
def test_unparsable_plan_files(tmp_path, text, words):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError) as info:
        CachePlan.from_json(path)
    assert str(path) in str(info.value) and words in str(info.value)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
@pytest.mark.parametrize("field, error", [
    ("steps[1].fractions[0][1]", ValueError), ("num_steps", TypeError), ("metadata.x", ValueError),
    ("steps[1].interval", TypeError), ("method", TypeError),
])
def test_nan_and_infinity_in_plan_files_are_rejected_naming_the_field(tmp_path, literal, field, error):
    data = _valid()
    data["metadata"] = {"x": 1.0}
    target = {"steps[1].fractions[0][1]": (data["steps"][1]["fractions"][0], 1), "num_steps": (data, "num_steps"),
              "metadata.x": (data["metadata"], "x"), "steps[1].interval": (data["steps"][1], "interval"),
              "method": (data, "method")}[field]
    target[0][target[1]] = "@@"
    path = _write(tmp_path, json.dumps(data).replace('"@@"', literal))
    with pytest.raises(error) as info:
        CachePlan.from_json(path)
    assert str(path) in str(info.value) and field in str(info.value)


def test_non_utf8_and_unreadable_plan_files(tmp_path):
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe\x00{\x00")
    with pytest.raises(ValueError, match=r"binary\.json.*not a UTF-8"):
        CachePlan.from_json(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CachePlan.from_json(tmp_path / "missing.json")


def test_nan_fraction_from_a_dict_is_rejected():
    data = _valid()
    data["steps"][1]["fractions"][0][0] = float("nan")
    with pytest.raises(ValueError, match=r"steps\[1\]\.fractions\[0\]\[0\]"):
        CachePlan.from_dict(data, "mine")


def test_integer_fractions_are_allowed_and_nothing_is_coerced():
    data = _valid()
    data["steps"][0]["fractions"] = [[1, 1], [1, 1]]
    data["steps"][1]["fractions"] = [[0, 1], [0.5, 0]]
    plan = CachePlan.from_dict(copy.deepcopy(data))
    assert plan.steps[1].fractions == [[0.0, 1.0], [0.5, 0.0]]
    assert plan.steps[1].skip_blocks is False and plan.steps[1].interval == 3


def test_version_2_layout_is_checked():
    data = _valid()
    data["version"] = 2
    data["block_names"] = ["b0", "b1"]
    data["block_modules"] = [["attn1", "ff"], ["ff"]]
    data["steps"][1]["forecast_order"] = 2
    validate_plan_dict(data, "v2.json")
    for key, value, field in [
        ("block_modules", [["attn1"]], "block_modules"),
        ("block_modules", [["attn1"], ["mlp"]], "block_modules[1][0]"),
        ("block_modules", [["attn1", "attn1"], ["ff"]], "block_modules[0]"),
        ("block_names", ["b0", 1], "block_names[1]"),
    ]:
        bad = copy.deepcopy(data)
        bad[key] = value
        with pytest.raises((ValueError, TypeError)) as info:
            validate_plan_dict(bad, "v2.json")
        assert "v2.json" in str(info.value) and field in str(info.value)


def test_version_3_forecast_weights_are_checked():
    data = _valid()
    data["version"] = 3
    data["steps"][1].update(forecast_order=1, forecast_weights=[-0.5, 1.5])
    validate_plan_dict(data, "v3.json")
    plan = CachePlan.from_dict(copy.deepcopy(data))
    assert plan.steps[1].forecast_weights == (-0.5, 1.5)
    assert CachePlan.from_json(plan.to_json()).steps[1].forecast_weights == (-0.5, 1.5)
    assert plan.to_dict()["version"] == 3 and fora_plan(4, 2, MODULES).to_dict()["version"] == 1
    for mutate, error, field in [
        (lambda d: d.update(version=2), ValueError, "version 3"),
        (lambda d: d["steps"][1].update(forecast_weights=[1.0]), ValueError, "2 to 5"),
        (lambda d: d["steps"][1].update(forecast_weights=[0.0] * 6), ValueError, "2 to 5"),
        (lambda d: d["steps"][1].update(forecast_weights="0.5"), TypeError, "steps[1].forecast_weights"),
        (lambda d: d["steps"][1].update(forecast_weights=[0.5, "1"]), TypeError, "steps[1].forecast_weights[1]"),
        (lambda d: d["steps"][1].update(forecast_weights=[0.5, True]), TypeError, "steps[1].forecast_weights[1]"),
        (lambda d: d["steps"][1].update(forecast_weights=[float("nan"), 1.0]), ValueError, "forecast_weights[0]"),
        (lambda d: d["steps"][1].update(forecast_weights=[1e4, 1.0]), ValueError, "forecast_weights[0]"),
        (lambda d: d["steps"][1].update(forecast_order=0), ValueError, "forecast_order >= 1"),
        (lambda d: d["steps"][1].pop("forecast_order"), ValueError, "forecast_order >= 1"),
    ]:
        bad = copy.deepcopy(data)
        mutate(bad)
        with pytest.raises(error) as info:
            validate_plan_dict(bad, "v3.json")
        assert "v3.json" in str(info.value) and field in str(info.value)
    steps = [dataclasses.replace(s, forecast_order=0) for s in plan.steps]  # a plan built in Python: the same rule
    with pytest.raises(ValueError, match=r"plan step 1: forecast_weights need forecast_order >= 1"):
        CachePlan(4, 2, MODULES, steps)
    assert plan.resample(8).steps[1].forecast_weights is None  # fitted for another step spacing: dropped


_MUTATION_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
    st.lists(st.integers(0, 1), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _paths(data, prefix=()):
    """Every (container, key) location in a JSON tree."""
    if isinstance(data, dict):
        for key, value in data.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield (*prefix, i)
            yield from _paths(value, (*prefix, i))


VALID = _valid()
LOCATIONS = list(_paths(VALID))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(LOCATIONS), _MUTATION_VALUES, st.sampled_from(["set", "delete"])),
                min_size=1, max_size=3))
def test_property_mutated_plans_load_exactly_or_fail_clearly(mutations):
    data = copy.deepcopy(VALID)
    for location, value, op in mutations:
        parent = data
        try:
            for key in location[:-1]:
                parent = parent[key]
            if op == "delete" and isinstance(parent, dict):
                parent.pop(location[-1], None)
            else:
                parent[location[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    try:
        plan = CachePlan.from_dict(data, "fuzz.json")
    except (ValueError, TypeError) as error:
        assert "fuzz.json" in str(error)
        return
    # accepted: it must be exactly what the file says, nothing coerced
    assert plan.num_steps == data["num_steps"] and isinstance(data["num_steps"], int)
    for step, raw in zip(plan.steps, data["steps"]):
        assert step.skip_blocks is raw.get("skip_blocks", False)
        assert step.interval == raw.get("interval", 1)
        for row, raw_row in zip(step.fractions, raw["fractions"]):
            for f, g in zip(row, raw_row):
                assert not isinstance(g, bool) and isinstance(g, (int, float)) and math.isfinite(g) and f == g


# ----------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(seed=2**64), ValueError, ["seed", "[0, 9223372036854775807]"]),
        (dict(seed=-1), ValueError, ["seed"]),
        (dict(interval=2**64), ValueError, ["interval", "[1, 1000]"]),
        (dict(fresh_ratio=10**400), ValueError, ["fresh_ratio", "[0.0, 1.0]"]),
        (dict(staleness_weight=math.inf), ValueError, ["staleness_weight", "finite"]),
        (dict(staleness_weight=1e300), ValueError, ["staleness_weight", "100"]),
        (dict(spatial_bonus=-math.inf), ValueError, ["spatial_bonus"]),
        (dict(spatial_grid=10**6), ValueError, ["spatial_grid", "64"]),
        (dict(first_full_steps=10**9), ValueError, ["first_full_steps", "1000"]),
        (dict(num_inference_steps=10**9), ValueError, ["num_inference_steps", "10000"]),
        (dict(selection=np.array(["vnorm"])), TypeError, ["selection", "ndarray"]),
        (dict(method=["duca"]), TypeError, ["method", "list"]),
        (dict(aggressive=None), TypeError, ["aggressive"]),
        (dict(method="plan"), ValueError, ["method='plan'", "plan="]),
        (dict(interval=np.float64(3.0)), TypeError, ["interval", "integer"]),
        (dict(fresh_ratio=np.array([0.1])), TypeError, ["fresh_ratio"]),
        (dict(fresh_ratio=np.bool_(True)), TypeError, ["fresh_ratio"]),
        (dict(fresh_ratio="0.5"), TypeError, ["fresh_ratio"]),
    ],
)
def test_config_values_are_bounded(kwargs, error, words):
    with pytest.raises(error) as info:
        DualCacheConfig(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_config_accepts_numpy_scalars_as_python_numbers():
    config = DualCacheConfig(interval=np.int64(4), fresh_ratio=np.float32(0.25), seed=np.uint64(7),
                             spatial_grid=np.int32(2), staleness_weight=np.float64(0.5),
                             selection=np.str_("random"), num_inference_steps=np.int16(20))
    assert (config.interval, config.fresh_ratio, config.seed, config.spatial_grid) == (4, 0.25, 7, 2)
    for name in ("interval", "seed", "spatial_grid", "num_inference_steps"):
        assert type(getattr(config, name)) is int
    assert type(config.fresh_ratio) is float and type(config.staleness_weight) is float
    assert type(config.selection) is str
    json.dumps(config.to_dict())  # plain Python values only


def test_presets_are_unchanged_and_valid():
    from dualcache_diffusers.config import PRESETS

    assert PRESETS["dit"]["duca"]["fresh_ratio"] == 0.06 and PRESETS["pixart"]["duca"]["fresh_ratio"] == 0.5
    for family, presets in PRESETS.items():
        for name in presets:
            DualCacheConfig.from_preset(name, family)


_ANY = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.integers(-3, 12),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1), st.text(max_size=8),
    st.sampled_from(["duca", "toca", "fora", "full", "plan", "vnorm", "random", "attention", "skip", "reuse",
                     "partial", "cycle", "dit-duca", "constant", "dit", "pixart", "pixart-toca", "forecast_error",
                     "forecast_error+vnorm"]),
    st.builds(np.int64, st.integers(-5, 50)), st.builds(np.float32, st.floats(-1, 2, width=32)),
    st.builds(lambda v: np.array([v]), st.integers(0, 3)), st.lists(st.integers(0, 3), max_size=2),
)
_FIELDS = ["method", "interval", "schedule", "fresh_ratio", "ratio_schedule", "selection", "aggressive",
           "self_attention", "staleness_weight", "spatial_bonus", "spatial_grid", "first_full_steps",
           "num_inference_steps", "seed", "forecast_order", "forecast_reanchor"]


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(_FIELDS), _ANY, max_size=4))
def test_property_configs_construct_cleanly_or_name_the_field(fields):
    try:
        config = DualCacheConfig(**fields)
    except (ValueError, TypeError) as error:
        assert any(name in str(error) for name in fields), str(error)
        return
    # accepted: every value is a plain, finite, bounded Python value, and a plan can be built from it
    values = config.to_dict()
    for name, value in values.items():
        assert type(value) in (int, float, str, type(None)) or (name == "forecast_reanchor" and type(value) is bool), \
            (name, value)
        if isinstance(value, float):
            assert math.isfinite(value)
    assert 0 <= config.fresh_ratio <= 1 and 1 <= config.interval <= 1000 and 0 <= config.seed < 2**63
    plan = config.build_plan(8, PlanLayout.uniform_layout(2, MODULES))
    assert plan.num_steps == 8 and plan.steps[0].is_full


# ------------------------------------------------------------------------------- router / checkpoint files


def _router_file(path: Path, routers: dict) -> Path:
    import argparse

    import torch

    torch.save({"routers": {f"{k}.prob": v for k, v in routers.items()}, "args": argparse.Namespace(lr=1e-3)}, path)
    return path


def _broken_router_files(tmp_path: Path) -> dict[str, Path]:
    import torch

    good = _router_file(tmp_path / "good.pt", {k: torch.zeros(4) for k in range(4)})
    raw = good.read_bytes()
    files = {}
    for name, data in {"empty": b"", "truncated": raw[: len(raw) // 2], "head": raw[:10], "text": b"hello\n",
                       "garbage": bytes(range(256)) * 3}.items():
        files[name] = tmp_path / f"{name}.pt"
        files[name].write_bytes(data)
    for name, routers in {
        "nan": {0: torch.tensor([0.0, float("nan"), 0.0, 0.0])},
        "inf": {0: torch.tensor([0.0, float("inf"), 0.0, 0.0])},
        "complex": {0: torch.zeros(4, dtype=torch.complex64)},
        "empty_logits": {0: torch.zeros(0)},
        "integer": {0: torch.zeros(4, dtype=torch.int64)},
        "odd_size": {0: torch.zeros(3)},
        "mixed_sizes": {0: torch.zeros(4), 1: torch.zeros(6)},
        "2d": {0: torch.zeros(2, 2)},
        "gap": {0: torch.zeros(4), 2: torch.zeros(4)},
        "overflow": {0: torch.tensor([1e300, 0.0], dtype=torch.float64)},
    }.items():
        files[name] = _router_file(tmp_path / f"{name}.pt", routers)
    files["list"] = tmp_path / "list.pt"
    torch.save([1, 2, 3], files["list"])
    return files


def test_broken_router_files_give_one_value_error_naming_the_file(tmp_path):
    from dualcache_diffusers.l2c.published import load_published_router

    for name, path in _broken_router_files(tmp_path).items():
        with pytest.raises(ValueError) as info:
            load_published_router(path)
        assert path.name in str(info.value), (name, str(info.value))
    assert load_published_router(tmp_path / "good.pt").num_steps == 4


@pytest.mark.parametrize(
    "logits, words",
    [
        ("torch.full((2, 2, 2), float('nan'))", "NaN"),
        ("torch.zeros((2, 2, 2), dtype=torch.complex64)", "real floating"),
        ("torch.zeros((0,))", "empty"),
        ("torch.zeros((2, 3, 2))", "shape"),
        ("[[0.0]]", "tensor"),
    ],
)
def test_router_export_rejects_bad_logits(logits, words):
    import torch  # noqa: F401 (used by eval)

    from dualcache_diffusers.l2c.router import RouterSpec, export_l2c

    spec = RouterSpec("l2c", 4, 2, MODULES, interval=2)
    with pytest.raises((ValueError, TypeError), match=words):
        export_l2c(spec, eval(logits), threshold=0.1)


def _checkpoint(tmp_path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "ckpt"
    path.mkdir()
    save_file({"logits": torch.zeros(2, 2, 2), "rng": torch.Generator().manual_seed(0).get_state()},
              str(path / "router.safetensors"))
    state = {"format": "dualcache-router-checkpoint", "version": 1, "spec": {"kind": "l2c"}, "iteration": 2,
             "budget": 0.5, "lr": 0.01, "l1": 0.1, "lambda": 1.0, "ref": float("nan"), "losses": [1.0],
             "metadata": {"learned": {"loss_space": "eps"}}}
    (path / "state.json").write_text(json.dumps(state))
    return path


@pytest.mark.parametrize(
    "breakage, words",
    [
        (lambda p: (p / "router.safetensors").write_bytes((p / "router.safetensors").read_bytes()[:40]),
         "router.safetensors is truncated"),
        (lambda p: (p / "router.safetensors").write_bytes(b""), "router.safetensors is truncated"),
        (lambda p: (p / "router.safetensors").unlink(), "router.safetensors is missing"),
        (lambda p: (p / "state.json").write_text("{"), "state.json is not valid JSON"),
        (lambda p: (p / "state.json").write_bytes(b"\xff\xfe"), "state.json is not valid JSON"),
        (lambda p: (p / "state.json").write_text("[]"), "dualcache-router-checkpoint"),
        (lambda p: (p / "state.json").write_text(
            (p / "state.json").read_text().replace('"iteration": 2', '"iteration": "2"')), "'iteration'"),
        (lambda p: (p / "state.json").write_text(
            (p / "state.json").read_text().replace('"lambda": 1.0', '"lambda": Infinity')), "'lambda'"),
    ],
)
def test_broken_checkpoints_give_one_value_error(tmp_path, breakage, words):
    from dualcache_diffusers.l2c.trainer import read_checkpoint

    path = _checkpoint(tmp_path)
    info, tensors = read_checkpoint(path)
    assert info["iteration"] == 2 and tensors["logits"].shape == (2, 2, 2)
    breakage(path)
    with pytest.raises(ValueError) as error:
        read_checkpoint(path)
    assert str(path) in str(error.value) and words in str(error.value)


def test_checkpoint_with_nan_logits_is_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    from dualcache_diffusers.l2c.trainer import read_checkpoint

    path = _checkpoint(tmp_path)
    save_file({"logits": torch.full((2, 2, 2), float("nan")), "rng": torch.Generator().get_state()},
              str(path / "router.safetensors"))
    with pytest.raises(ValueError, match="NaN"):
        read_checkpoint(path)


_ENABLE_FIELDS = [f for f in _FIELDS if f not in ("method", "num_inference_steps")]
_RUN_PIPE: list = []


def _run_pipe():
    if not _RUN_PIPE:
        from conftest import engine_dit_pipeline

        _RUN_PIPE.append(engine_dit_pipeline(num_layers=2))
    return _RUN_PIPE[0]


def _images(pipe):
    import torch

    return pipe(class_labels=[1, 2], num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                output_type="np").images


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["duca", "toca", "fora", "full"]), st.dictionaries(st.sampled_from(_ENABLE_FIELDS), _ANY,
                                                                           max_size=3))
def test_property_enable_refuses_before_hooking_or_runs_and_disable_is_bit_exact(preset, fields):
    from dualcache_diffusers import disable_dual_cache, enable_dual_cache

    pipe = _run_pipe()
    if not hasattr(pipe, "_stock"):
        pipe._stock = _images(pipe)
    try:
        enable_dual_cache(pipe, preset, **fields)
    except (ValueError, TypeError) as error:
        assert any(name in str(error) for name in fields), str(error)
        assert not any(hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks for m in pipe.transformer.modules())
        return
    try:
        assert np.isfinite(_images(pipe)).all()
    finally:
        disable_dual_cache(pipe)
    assert np.array_equal(_images(pipe), pipe._stock)
