"""The command line never prints a traceback for a user mistake: one line on stderr, exit status 2, saying what
was wrong and what is allowed, before any model is loaded (issue 12, items 12, 13, 15, 16)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dualcache_diffusers import cli

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


@pytest.fixture(autouse=True)
def _no_model_loading(monkeypatch):
    """Every case below must fail before a pipeline is loaded."""
    import dualcache_diffusers.bench as bench

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(bench, "load_pipeline", refuse)


def _files(tmp_path: Path) -> dict[str, Path]:
    files = {"empty": tmp_path / "empty.json", "nonplan": tmp_path / "nonplan.json", "list": tmp_path / "list.json",
             "badcsv": tmp_path / "bad.csv", "binarycsv": tmp_path / "binary.csv", "emptycsv": tmp_path / "e.csv",
             "router": tmp_path / "router.pt", "notdir": tmp_path / "file.txt"}
    files["empty"].write_text("")
    files["nonplan"].write_text(json.dumps({"format": "something-else"}))
    files["list"].write_text("[1, 2, 3]")
    files["badcsv"].write_text("a,b\n1,2\n")
    files["binarycsv"].write_bytes(b"\xff\xfe\x00garbage")
    files["emptycsv"].write_text("")
    files["router"].write_bytes(b"PK\x03\x04 truncated")
    files["notdir"].write_text("hello")
    return files


CASES = [
    (["demo", "--device", "gpu"], ["--device 'gpu'", "cpu, cuda"]),
    (["demo", "--device", "cuda:x"], ["--device"]),
    (["demo", "--model", "DIT"], ["--model 'DIT'", "did you mean 'dit'"]),
    (["demo", "--model", "./no/such/pipeline"], ["no such directory", "Hub repo id"]),
    (["demo", "--model", "not a repo!"], ["--model", "allowed"]),
    (["demo", "--model", "{notdir}"], ["is a file"]),
    (["demo", "--model", "{tmp}"], ["no model_index.json"]),
    (["demo", "--prompt", "a thick seven"], ["--prompt", "class-conditional"]),
    (["bench", "--prompt", "a cat"], ["--prompt", "class-conditional"]),
    (["demo", "--threads", "-3"], ["--threads", "-3", ">= 1"]),
    (["demo", "--threads", "two"], ["--threads", "not an integer"]),
    (["demo", "--num-images", "0"], ["--num-images", ">= 1"]),
    (["demo", "--dtype", "float8"], ["--dtype", "float32"]),
    (["bench", "--budgets", "nan"], ["--budgets", "finite"]),
    (["bench", "--seeds", "0"], ["--seeds"]),
    (["demo", "--bogus"], ["unrecognized arguments"]),
    (["nosuchcommand"], ["invalid choice"]),
    (["report", "{badcsv}", "--out", "{tmp}/r"], ["bad.csv", "results.csv", "no column"]),
    (["report", "{binarycsv}", "--out", "{tmp}/r"], ["binary.csv", "results.csv"]),
    (["report", "{emptycsv}", "--out", "{tmp}/r"], ["e.csv"]),
    (["plan", "{empty}"], ["empty.json", "empty"]),
    (["plan", "{nonplan}"], ["nonplan.json", "not a dualcache plan"]),
    (["plan", "{list}"], ["list.json", "top level"]),
    (["plan", "{router}"], ["router.pt"]),
    (["plan", "{tmp}/missing.json"], ["missing.json", "does not exist"]),
    (["plan", "{tmp}"], ["is not a file"]),
    (["calibrate", "--model", "dit", "--budget", "1", "--out", "{tmp}/p.json"], ["budget=1.0", "(1, 10]"]),
    (["calibrate", "--model", "dit", "--budget", "12", "--out", "{tmp}/p.json"], ["budget=12.0", "(1, 10]"]),
    (["calibrate", "--model", "dit", "--budget", "nan", "--out", "{tmp}/p.json"], ["--budget", "finite"]),
    (["calibrate", "--model", "dit", "--out", "{tmp}/p.json"], ["--budget"]),
    (["calibrate", "--model", "dit", "--budget", "3", "--out", "{tmp}"], ["--out", "is a directory"]),
    (["calibrate", "--model", "dit", "--budget", "3", "--out", "{tmp}/no/p.json"], ["--out", "does not exist"]),
    (["calibrate", "--model", "DIT", "--budget", "3", "--out", "{tmp}/p.json"], ["did you mean 'dit'"]),
    (["calibrate", "--model", "dit", "--budget", "3", "--out", "{tmp}/p.json", "--seeds", "-1"], ["--seeds"]),
    (["train-router", "--model", "dit", "--out", "{tmp}/p.txt"], ["--out", "json"]),
    (["train-router", "--model", "dit", "--out", "{tmp}/p.json", "--device", "gpu"], ["--device 'gpu'"]),
    (["train-router", "--model", "dit", "--out", "{tmp}/p.json", "--budget", "2"], ["--budget", "(0, 1]"]),
    (["train-router", "--model", "DIT", "--out", "{tmp}/p.json"], ["did you mean 'dit'"]),
    (["train-router", "--model", "dit", "--out", "{tmp}/p.json", "--resume", "{tmp}/nockpt"], ["--resume"]),
    (["train-router", "--model", "dit", "--out", "{tmp}/p.json", "--prompts", "{tmp}/none.txt"], ["--prompts"]),
    (["train-router", "--model", "dit", "--out", "{tmp}/p.json", "--forecast-order", "2"],
     ["--forecast-order", "invalid choice", "0, 1"]),
    (["train-router", "--model", "dit", "--out", "{tmp}/p.json", "--forecast-order", "one"],
     ["--forecast-order", "invalid int"]),
]


@pytest.mark.parametrize("args, words", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_user_mistakes_give_one_line_and_exit_2(tmp_path, capsys, args, words):
    files = _files(tmp_path)
    names = {"tmp": str(tmp_path), **{k: str(v) for k, v in files.items()}}
    argv = [a.format(**names) for a in args]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert lines[0].startswith("dualcache"), lines[0]
    for word in words:
        assert word.format(**names) in lines[0], (word, lines[0])


def test_cuda_without_cuda_is_one_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli.main(["demo", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA is not available" in err and "--device cpu" in err


def test_hub_id_offline_is_one_line(monkeypatch, capsys):
    """An uncached Hub id with no network: diffusers raises OSError; the CLI says what happened in one line."""
    import dualcache_diffusers.bench as bench

    def offline(*args, **kwargs):
        raise OSError("Cannot load model owner/name: the model is not fully cached locally ... outgoing traffic "
                      "has been disabled ...")

    monkeypatch.setattr(bench, "load_pipeline", offline)
    assert cli.main(["demo", "--model", "someone/some-dit"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "could not load it from the Hugging Face Hub" in err and "outgoing traffic" not in err


def _run(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(SRC), **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=environment, cwd=cwd,
                          timeout=120)


def test_help_is_fast_and_imports_no_torch(tmp_path):
    code = ("import sys, time; t = time.perf_counter(); from dualcache_diffusers import cli; "
            "cli.build_parser() if cli._import_plugins() is None else None; "
            "print(time.perf_counter() - t, 'torch' in sys.modules, 'diffusers' in sys.modules)")
    seconds, torch_loaded, diffusers_loaded = _run("-c", code).stdout.split()
    assert torch_loaded == "False" and diffusers_loaded == "False"
    assert float(seconds) < 1.0
    start = time.perf_counter()
    done = _run("-m", "dualcache_diffusers", "--help", cwd=tmp_path)
    elapsed = time.perf_counter() - start
    assert done.returncode == 0 and "train-router" in done.stdout
    assert elapsed < 5.0, elapsed  # interpreter start included; measured 0.2 s on the 2-core CPU


def test_version_and_module_entry_point(tmp_path):
    done = _run("-m", "dualcache_diffusers", "--version", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("dualcache 0.")


def test_every_option_has_help_with_its_default():
    cli._import_plugins()
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, child in subparsers.choices.items():
        text = child.format_help()
        for action in child._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, (name, action.option_strings)
            takes_value = action.nargs != 0
            if takes_value and not action.required:
                shown = cli._Formatter(name)._get_help_string(action)
                assert "default" in shown, (name, action.option_strings, shown)
        assert "(default:" in text


def test_train_router_device_default_matches_demo_and_bench():
    cli._import_plugins()
    parser = cli.build_parser()
    defaults = {cmd: parser.parse_args([cmd, *extra]).device for cmd, extra in
                [("demo", []), ("bench", []), ("train-router", ["--model", "dit", "--out", "p.json"])]}
    assert set(defaults.values()) == {"cpu"}, defaults


def test_bench_method_names_match_the_benchmark():
    from dualcache_diffusers import bench
    from dualcache_diffusers._names import METHOD_ORDER

    assert bench.METHOD_ORDER == METHOD_ORDER
    assert set(METHOD_ORDER) >= set(bench.build_methods(6))


# ------------------------------------------------------------------------------------------------ outputs


def test_plan_writes_into_out_folder_not_next_to_the_json(tmp_path, capsys, monkeypatch):
    from dualcache_diffusers.plan import fora_plan

    source = tmp_path / "plans"
    source.mkdir()
    fora_plan(6, 2, ("attn1", "ff")).to_json(source / "p.json")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert cli.main(["plan", str(source / "p.json")]) == 0
    out = capsys.readouterr().out
    assert (work / "dualcache-plan" / "p.png").is_file() and not (source / "p.png").exists()
    assert "legend: step pattern" in out and "P = partial" in out
    assert cli.main(["plan", str(source / "p.json"), "--out", str(tmp_path / "mine")]) == 0
    assert (tmp_path / "mine" / "p.png").is_file()


def test_bench_marks_fd_of_few_images_as_not_meaningful():
    from dualcache_diffusers.bench import BenchResult, BenchRow, Quality, markdown_table

    row = BenchRow("uncached", None, {}, 1.0, 1.0, Quality(float("inf"), 1.0, 17.0, 0.9), "FFFF", "", "reference")
    few = markdown_table(BenchResult([row], {}, num_images=2, steps=4, has_classifier=True))
    assert "17.00 (n/m)" in few and "not meaningful" in few and "2 images" in few
    many = markdown_table(BenchResult([row], {}, num_images=100, steps=4, has_classifier=True))
    assert "(n/m)" not in many and "not meaningful" not in many
    assert "F = full" in few and "C = conservative" in few


def test_demo_grid_headers_say_digit_and_seed_and_keep_whole_captions():
    from dualcache_diffusers.demo import DemoResult, DemoRow, image_grid

    images = np.zeros((2, 8, 8, 3), dtype=np.float32)
    dit = DemoResult([DemoRow("uncached", "FF", 1, images)], 2, 2, [3, 7], seeds=[10, 11],
                     labels={3: "three", 7: "seven"})
    assert dit.column_header(0) == "digit 3\nseed 10" and dit.column_header(1) == "digit 7\nseed 11"
    caption = "a thick slanted seven written with a wide pen"
    text = DemoResult([DemoRow("uncached", "FF", 1, images)], 2, 2, [caption, "a two"], seeds=[0, 1])
    assert text.column_header(0) == f"{caption}\nseed 0"
    short = image_grid(DemoResult([DemoRow("uncached", "FF", 1, images)], 2, 2, ["a two", "a one"], seeds=[0, 1]))
    tall = image_grid(text)
    assert tall.height > short.height  # the long caption is wrapped over more header lines, not cut


def test_dualcache_pipeline_precheck_never_goes_to_the_network(monkeypatch):
    from diffusers import DiffusionPipeline

    from dualcache_diffusers import pipeline

    seen = {}

    def load_config(path, **kwargs):
        seen.update(kwargs)
        raise OSError("not cached")

    monkeypatch.setattr(DiffusionPipeline, "load_config", load_config)
    pipeline._check_transformer_class("someone/uncached-repo", {})
    assert seen.get("local_files_only") is True


def test_dualcache_pipeline_offline_hub_id_fails_as_fast_as_stock():
    from dualcache_diffusers import DualCachePipeline

    start = time.perf_counter()
    with pytest.raises(OSError):
        DualCachePipeline.from_pretrained("dualcache-test/surely-not-a-repo-4f1c")
    assert time.perf_counter() - start < 10  # was 23 s of retries in the pre-check alone


def test_quickstart_runs_on_the_shipped_pixart_and_writes_to_its_out_folder(tmp_path):
    done = _run(str(ROOT / "examples" / "quickstart.py"), "--model", "pixart", "--steps", "2",
                "--out", str(tmp_path / "q"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "q" / "stock_0.png").is_file() and (tmp_path / "q" / "duca_0.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # nothing written into the working directory
