"""dualcache: feature caching (DuCa, ToCa, FORA, Learning-to-Cache) for diffusers transformer pipelines.

    dualcache demo                      # the shipped digits DiT: uncached vs DuCa / FORA / ToCa, offline, CPU
    dualcache demo --model pixart       # the shipped PixArt digits model (or any local dir / Hub id)
    dualcache demo --model video        # the shipped moving-digits LattePipeline: clips, an animated GIF
    dualcache bench --out bench-dit     # fidelity at matched FLOPs budgets: CSV, markdown, plot
    dualcache bench --quick             # a reduced setting (seconds on tiny models)
    dualcache calibrate --model dit --budget 3 --out plan.json   # a schedule searched for 3x fewer FLOPs
    dualcache report a/results.csv b/results.csv --out both   # one table + plot from runs on the same images

Subcommands are registered with :func:`register_subcommand`; a module that adds one (say
``train-router``) calls it at import time and is named in :data:`SUBCOMMAND_MODULES` so that
``main`` imports it. Only this module prints; the library logs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from ._names import CLASS_CONDITIONAL_PIPELINES, METHOD_ORDER, MODEL_ALIASES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]  # adds the subcommand's arguments
    run: Callable[[argparse.Namespace], int | None]  # returns the exit status (None = 0)


_SUBCOMMANDS: dict[str, Subcommand] = {}

# Modules imported by ``main`` so that they can register their subcommands (missing ones are ignored).
SUBCOMMAND_MODULES: list[str] = [
    "dualcache_diffusers.l2c.cli",  # train-router, plan
    "dualcache_diffusers.space",  # app
]


def register_subcommand(
    name: str,
    help: str,
    configure: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int | None],
) -> None:
    """Add ``dualcache NAME``: ``configure(parser)`` declares its arguments, ``run(args)`` executes it."""
    if name in _SUBCOMMANDS and _SUBCOMMANDS[name].run is not run:
        raise ValueError(f"subcommand {name!r} is already registered")
    _SUBCOMMANDS[name] = Subcommand(name, help, configure, run)


def _import_plugins() -> None:
    for module in SUBCOMMAND_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name is None or not module.startswith(error.name):
                raise


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help with every option's default; an option whose help already says its default is left as is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or not action.option_strings):
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2), like every other user mistake of the CLI."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    from importlib import metadata

    try:
        version = metadata.version("dualcache-diffusers")
    except metadata.PackageNotFoundError:  # running from a source tree
        from . import __version__ as version
    return f"dualcache {version} (python -m dualcache_diffusers)"


def build_parser() -> argparse.ArgumentParser:
    description = __doc__.split("\n\n")[0] + "\n\n" + "\n".join(__doc__.split("\n\n")[1].splitlines()[:5])
    parser = _Parser(prog="dualcache", description=description, formatter_class=_Formatter)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-v info, -vv debug and full tracebacks)")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in _SUBCOMMANDS.values():
        child = sub.add_parser(command.name, help=command.help, description=command.help, formatter_class=_Formatter)
        command.configure(child)
        child.set_defaults(_run=command.run)
    return parser


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    _import_plugins()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help / --version (0) or a one-line argument error (2)
        return done.code if isinstance(done.code, int) else 2
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args._run(args) or 0)
    except (ValueError, TypeError, OSError, ImportError, UserError) as error:
        if args.verbose >= 2:
            raise
        print(f"dualcache {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dualcache {args.command}: interrupted", file=sys.stderr)
        return 130


class UserError(Exception):
    """A mistake in the command line; printed as one line, exit status 2."""


# ------------------------------------------------------------------------------------------- shared


def _int_at_least(minimum: int):
    """argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is not allowed; it must be an integer >= {minimum}")
        return value

    return parse


positive_int = _int_at_least(1)
nonnegative_int = _int_at_least(0)


def finite_float(text: str) -> float:
    """argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; it must be a finite number")
    return value


DEVICE_HELP = "torch device: cpu, cuda, cuda:N or mps"


def add_model_arguments(parser: argparse.ArgumentParser, steps: int, dtype: bool = True, prompt: bool = True,
                        model_default: str | None = "dit") -> None:
    """--model, --device, --dtype, --steps, --guidance, --prompt, --threads (shared by every command)."""
    model_help = ("'dit' / 'pixart' / 'video' (the digits models shipped with the package; 'video' is a "
                  "text-to-video LattePipeline), a local pipeline directory "
                  "(with model_index.json) or a Hugging Face Hub repo id (owner/name)")
    if model_default is None:
        parser.add_argument("--model", required=True, help=model_help)
    else:
        parser.add_argument("--model", default=model_default, help=model_help)
    parser.add_argument("--device", default="cpu", help=DEVICE_HELP)
    if dtype:
        parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                            help="weights and compute dtype")
    parser.add_argument("--steps", type=positive_int, default=steps, help="denoising steps")
    if prompt:
        parser.add_argument("--guidance", type=finite_float, default=None,
                            help="CFG scale (default: the pipeline's own)")
        parser.add_argument("--prompt", nargs="+", default=None,
                            help="prompts for text-to-image pipelines (default: digit captions); class-conditional "
                                 "pipelines (DiT) take no prompt")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: 1 for small models on CPU, else torch's default)")


_add_model_arguments = add_model_arguments  # the old private name

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_DEVICE = re.compile(r"^(cpu|cuda|cuda:\d+|mps)$")
MODEL_ALLOWED = ("allowed: 'dit', 'pixart', 'video' (the shipped digits models), a local pipeline directory "
                 "(with model_index.json) or a Hugging Face Hub repo id (owner/name)")


@dataclass(frozen=True)
class ModelRef:
    """What --model names, checked before anything is loaded."""

    name: str  # as given
    source: str  # what from_pretrained gets
    where: str  # "shipped", "local" or "hub"
    pipeline_class: str | None = None  # from model_index.json where it can be read without loading

    @property
    def class_conditional(self) -> bool | None:
        if self.pipeline_class is None:
            return None
        return self.pipeline_class in CLASS_CONDITIONAL_PIPELINES


def _pipeline_class(directory: Path) -> str | None:
    import json

    try:
        index = json.loads((directory / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"--model {str(directory)!r}: its model_index.json cannot be read ({error})") from None
    name = index.get("_class_name") if isinstance(index, dict) else None
    if not isinstance(name, str):
        raise UserError(f"--model {str(directory)!r}: its model_index.json names no pipeline class")
    return name


def check_model(model: str) -> ModelRef:
    """Resolve --model without loading anything: an alias, an existing pipeline directory or a Hub repo id."""
    if model in MODEL_ALIASES:
        path = MODEL_ALIASES[model]
        return ModelRef(model, str(path), "shipped", _pipeline_class(path))
    if model.lower() in MODEL_ALIASES:
        raise UserError(f"--model {model!r} is unknown; did you mean {model.lower()!r}? {MODEL_ALLOWED}")
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(f"--model {model!r}: the directory has no model_index.json, so it is not a diffusers "
                            f"pipeline; {MODEL_ALLOWED}")
        return ModelRef(model, str(path), "local", _pipeline_class(path))
    if path.exists():
        raise UserError(f"--model {model!r} is a file, not a pipeline directory; {MODEL_ALLOWED}")
    looks_like_path = model.startswith((".", "~", "/")) or "\\" in model or model.count("/") > 1
    if looks_like_path or not _HUB_ID.match(model):
        what = "no such directory" if looks_like_path or "/" in model else "not a shipped model, directory or Hub id"
        raise UserError(f"--model {model!r}: {what}; {MODEL_ALLOWED}")
    return ModelRef(model, model, "hub")


def check_device(device: str) -> None:
    """Fail on a device name torch does not know, or one this machine does not have, before loading a model."""
    if not _DEVICE.match(device):
        raise UserError(f"--device {device!r} is not a torch device; allowed: cpu, cuda, cuda:N (N = GPU index), mps")
    if device == "cpu":
        return
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UserError(f"--device {device}: CUDA is not available here ({build}); use --device cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                            f"allowed: cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: Apple's MPS backend is not available here; use --device cpu")


def check_model_arguments(args: argparse.Namespace) -> ModelRef:
    """Every check of the shared model arguments that needs no model: run before anything is loaded."""
    ref = check_model(args.model)
    check_device(args.device)
    if getattr(args, "prompt", None) and ref.class_conditional:
        raise UserError(f"--prompt: {ref.name} is a class-conditional {ref.pipeline_class}; it takes class labels, "
                        "not prompts (the digits 0-9 for 'dit'); drop --prompt, or use a text-to-image model "
                        "such as --model pixart")
    return ref


def load_model(ref: ModelRef, device: str, dtype: str = "float32") -> Any:
    """Load the pipeline; a Hub id that cannot be fetched is one clear error, not diffusers' traceback."""
    from diffusers.utils import logging as diffusers_logging

    from .bench import load_pipeline

    verbosity = diffusers_logging.get_verbosity()
    if ref.where == "hub" and not logger.isEnabledFor(logging.INFO):
        diffusers_logging.set_verbosity_error()  # "Couldn't connect to the Hub ..." lines: the error below says it
    try:
        return load_pipeline(ref.source, device, dtype)
    except OSError as error:
        if ref.where != "hub":
            raise
        raise UserError(
            f"--model {ref.name}: could not load it from the Hugging Face Hub: it is not in the local cache and "
            f"the Hub could not be reached or has no such public repo ({type(error).__name__}); connect to the "
            f"network or download it first, or use --model dit / pixart (shipped, offline)"
        ) from None
    finally:
        diffusers_logging.set_verbosity(verbosity)


def _load(args: argparse.Namespace, ref: ModelRef | None = None):
    ref = ref or check_model_arguments(args)
    logger.info("loading %s ...", args.model)
    pipe = load_model(ref, args.device, args.dtype)
    from .bench import is_class_conditional

    if getattr(args, "prompt", None) and is_class_conditional(pipe):
        raise UserError(f"--prompt: {args.model} is a class-conditional {type(pipe).__name__}; it takes class "
                        "labels, not prompts; drop --prompt")
    import torch

    threads = args.threads
    if threads is None and str(args.device).startswith("cpu"):
        params = sum(p.numel() for p in pipe.transformer.parameters())
        threads = 1 if params < 20_000_000 else None  # tiny models run faster single-threaded
    if threads:
        torch.set_num_threads(threads)
    return pipe


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="call", file=sys.stderr, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------- demo


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, steps=20)
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="first seed; image i uses seed + i")
    parser.add_argument("--num-images", type=positive_int, default=8, help="images (clips) per method")
    parser.add_argument("--repeats", type=positive_int, default=3, help="interleaved timing rounds")
    parser.add_argument("--out", type=Path, default=Path("dualcache-demo"),
                        help="folder for grid.png and results.md, and clips.gif for a video model "
                             "(default: ./dualcache-demo)")


def _run_demo(args: argparse.Namespace) -> int:
    ref = check_model_arguments(args)
    from .demo import DEMO_METHODS, image_grid, run_demo, save_clip_gif

    pipe = _load(args, ref)
    with _progress(len(DEMO_METHODS) * (1 + args.repeats), "demo") as bar:
        result = run_demo(pipe, steps=args.steps, seed=args.seed, num_images=args.num_images, repeats=args.repeats,
                          conditions=args.prompt, guidance_scale=args.guidance, progress=bar)
    args.out.mkdir(parents=True, exist_ok=True)
    what = f"{result.num_images} clips of {result.frames} frames" if result.frames else f"{result.num_images} images"
    header = (f"{args.model}: {what} (seeds {args.seed}..{args.seed + result.num_images - 1}), "
              f"{result.steps} steps, {args.device} {args.dtype}; wall = median of {args.repeats} interleaved runs\n\n")
    table = header + result.table()
    written = [args.out / "grid.png", args.out / "results.md"]
    written[1].write_text(table)
    image_grid(result).save(written[0])
    if result.frames:  # video: the clips of every method side by side, animated
        written.insert(0, save_clip_gif(result, args.out / "clips.gif"))
    print(table)
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


# -------------------------------------------------------------------------------------------- bench


def _configure_bench(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, steps=20)
    parser.add_argument("--seeds", type=positive_int, default=10,
                        help="seeds per class / prompt; images = seeds x conditions")
    parser.add_argument("--budgets", type=finite_float, nargs="+", default=None,
                        help="target FLOPs reductions (default: 1.5 2 2.5 3 4)")
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                        help=f"subset of: {', '.join(METHOD_ORDER)} (default: all that can run)")
    parser.add_argument("--plan", action="append", default=[], metavar="NAME=PATH",
                        help="add a learned cache plan (JSON) as a method; repeatable")
    parser.add_argument("--classifier", type=Path, default=None,
                        help="digits classifier dir (default: the shipped one; missing -> no FD / accuracy)")
    parser.add_argument("--calibration-seeds", type=positive_int, default=2, help="seeds of the knob search")
    parser.add_argument("--batch-size", type=positive_int, default=50, help="images per pipeline call")
    parser.add_argument("--match-flops", action="store_true",
                        help="also run duca-budget at the FLOPs ratio each other method achieved where that is "
                             "more than 3%% from duca-budget's own (integer knobs cannot always meet a budget)")
    parser.add_argument("--out", type=Path, default=Path("dualcache-bench"),
                        help="output folder (default: ./dualcache-bench)")
    parser.add_argument("--quick", action="store_true",
                        help="reduced setting: 6 steps, 1 seed, 2 conditions, budget 2x, 5 methods (FD is then "
                             "marked not meaningful: too few images)")


QUICK_METHODS = ("uncached", "steps", "fora", "duca", "fbcache")


def _parse_plans(items: Sequence[str]) -> dict[str, Path]:
    plans = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--plan {item!r} must look like NAME=path/to/plan.json")
        if name in METHOD_ORDER:
            raise ValueError(f"--plan {item!r}: {name!r} is a built-in method name; pick another name")
        if not Path(path).is_file():
            raise FileNotFoundError(f"--plan {name}: no such file {path!r}")
        plans[name] = Path(path)
    return plans


def _apply_quick(args: argparse.Namespace) -> None:
    """--quick changes the defaults the user did not override."""
    if args.quick:
        args.steps = 6 if args.steps == 20 else args.steps
        args.seeds = 1 if args.seeds == 10 else args.seeds


def _selected_methods(args: argparse.Namespace) -> list[str]:
    wanted = args.methods or (list(QUICK_METHODS) if args.quick else list(METHOD_ORDER))
    unknown = [m for m in wanted if m not in METHOD_ORDER]
    if unknown:
        raise ValueError(f"--methods {' '.join(unknown)}: unknown; allowed: {', '.join(METHOD_ORDER)}")
    return wanted


def _budgets(args: argparse.Namespace) -> list[float]:
    budgets = args.budgets or ([2.0] if args.quick else [1.5, 2.0, 2.5, 3.0, 4.0])
    for budget in budgets:
        if budget < 1.0:
            raise ValueError(f"--budgets {budget}: a budget is a FLOPs reduction factor >= 1")
    return budgets


def _run_bench(args: argparse.Namespace) -> int:
    _apply_quick(args)
    plans = _parse_plans(args.plan)
    wanted, budgets = _selected_methods(args), _budgets(args)
    if args.match_flops and "duca-budget" not in wanted:
        raise ValueError("--match-flops runs duca-budget at the other methods' FLOPs: add duca-budget to --methods")
    ref = check_model_arguments(args)
    from . import metrics
    from .bench import (
        BenchConfig,
        Workload,
        build_methods,
        check_plan_steps,
        count_jobs,
        default_conditions,
        run_benchmark,
        unavailable_methods,
        write_reports,
    )

    check_plan_steps(plans, args.steps)
    available = build_methods(args.steps, plans)
    methods = {name: available[name] for name in [*wanted, *plans] if name in available}

    pipe = _load(args, ref)
    conditions = args.prompt or default_conditions(pipe, 2 if args.quick else 10)
    workload = Workload(pipe, args.steps, list(range(args.seeds)), conditions, guidance_scale=args.guidance,
                        batch_size=args.batch_size)
    classifier = metrics.load_classifier(args.classifier)
    if classifier is None:
        print("warning: no digits classifier found: Frechet distance and accuracy are skipped", file=sys.stderr)
    config = BenchConfig(budgets=budgets, calibration_seeds=[1000 + i for i in range(args.calibration_seeds)],
                         calibration_conditions=1 if args.quick else 2,
                         match_to="duca-budget" if args.match_flops else None)
    with _progress(count_jobs(methods.values(), budgets), "bench") as bar:
        result = run_benchmark(workload, methods, config, classifier=classifier, progress=bar)
    result.model = args.model
    result.skipped.update({name: why for name, why in unavailable_methods().items() if name in wanted})
    paths = write_reports(result, args.out)
    print(paths["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _configure_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("csv", nargs="+", type=Path, help="results.csv files of `dualcache bench` runs")
    parser.add_argument("--out", type=Path, required=True, help="output folder (required)")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="METHOD",
                        help="leave these methods out (default: none)")
    parser.add_argument("--title", default="", help="the table's and plot's title, e.g. the model (default: none)")
    parser.add_argument("--images", type=nonnegative_int, default=0,
                        help="images per row, for the header (default: 0 = not stated)")
    parser.add_argument("--steps", type=nonnegative_int, default=0,
                        help="denoising steps, for the header (default: 0 = not stated)")


def _run_report(args: argparse.Namespace) -> int:
    for path in args.csv:
        if not path.is_file():
            raise FileNotFoundError(f"report: no such file {str(path)!r}")
    from .bench import merge_results, write_reports

    result = merge_results(args.csv, exclude=args.exclude, num_images=args.images, steps=args.steps,
                           model=args.title)
    paths = write_reports(result, args.out)
    print(paths["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


# ---------------------------------------------------------------------------------------- calibrate


def _configure_calibrate(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, steps=20, model_default=None)
    parser.add_argument("--budget", type=finite_float, required=True,
                        help="FLOPs reduction of the denoiser to reach, e.g. 3 (in (1, 10]; required)")
    parser.add_argument("--out", type=Path, required=True, help="the plan JSON to write (required)")
    parser.add_argument("--seeds", type=nonnegative_int, nargs="+", default=[1000, 1001],
                        help="calibration seeds (keep them apart from the seeds you evaluate on)")
    parser.add_argument("--conditions", type=positive_int, default=10,
                        help="classes / captions per seed (spread over the digits; default 10: 20 images with the "
                             "default seeds)")


def _run_calibrate(args: argparse.Namespace) -> int:
    from .budget import check_budget

    check_budget(args.budget)
    if args.out.is_dir():
        raise UserError(f"--out {str(args.out)!r} is a directory; give the plan file to write, e.g. plan.json")
    if not args.out.parent.is_dir():
        raise UserError(f"--out {str(args.out)!r}: the folder {str(args.out.parent)!r} does not exist")
    ref = check_model_arguments(args)
    from .bench import Workload, default_conditions
    from .calibrate import calibrate, search_size

    pipe = _load(args, ref)
    conditions = args.prompt or default_conditions(pipe, 10)
    step = max(1, len(conditions) // args.conditions)
    conditions = list(conditions)[::step][: args.conditions]
    workload = Workload(pipe, args.steps, list(args.seeds), conditions, guidance_scale=args.guidance,
                        batch_size=len(args.seeds) * len(conditions))
    with _progress(search_size(), "calibrate") as bar:
        plan = calibrate(pipe, workload, args.budget, progress=bar)
    plan.to_json(args.out)
    info = plan.metadata["calibration"]
    print(plan.summary().splitlines()[1].strip())
    print(f"budget {args.budget:g}x: predicted {info['predicted_flops_ratio']:.3f}x, calibration PSNR "
          f"{info['psnr']:.2f} dB (default rule {info['default_rule_psnr']:.2f} dB) on {info['images']} images; "
          f"use it with enable_dual_cache(pipe, plan={str(args.out)!r})")
    print(f"wrote {args.out}")
    return 0


register_subcommand("demo", "uncached vs DuCa / FORA / ToCa on the same seeds: speed, FLOPs, PSNR / SSIM, a grid",
                    _configure_demo, _run_demo)
register_subcommand("bench", "fidelity benchmark at matched FLOPs budgets: CSV, markdown table, speed-quality plot",
                    _configure_bench, _run_bench)
register_subcommand("calibrate", "search a DuCa forecasting schedule for a FLOPs budget on a few seeds; write a plan",
                    _configure_calibrate, _run_calibrate)
register_subcommand("report", "merge `dualcache bench` results (CSV) of runs on the same images: one table and plot",
                    _configure_report, _run_report)


if __name__ == "__main__":
    sys.exit(main())
