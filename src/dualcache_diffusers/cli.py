"""``dualcache``: the command line.

    dualcache demo                      # the shipped digits DiT: uncached vs DuCa / FORA / ToCa, offline, CPU
    dualcache demo --model pixart       # the shipped PixArt digits model (or any local dir / Hub id)
    dualcache bench --out bench-dit     # fidelity at matched FLOPs budgets: CSV, markdown, plot
    dualcache bench --quick             # a reduced setting (seconds on tiny models)
    dualcache report a/results.csv b/results.csv --out both   # one table + plot from runs on the same images

Subcommands are registered with :func:`register_subcommand`; a module that adds one (say
``train-router``) calls it at import time and is named in :data:`SUBCOMMAND_MODULES` so that
``main`` imports it. Only this module prints; the library logs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dualcache", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in _SUBCOMMANDS.values():
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        command.configure(child)
        child.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _import_plugins()
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args._run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as error:
        if args.verbose >= 2:
            raise
        print(f"dualcache {args.command}: error: {error}", file=sys.stderr)
        return 2


# ------------------------------------------------------------------------------------------- shared


def _add_model_arguments(parser: argparse.ArgumentParser, steps: int) -> None:
    parser.add_argument("--model", default="dit",
                        help="'dit' / 'pixart' (the shipped digits models), a local pipeline dir or a Hub id "
                             "(default: dit)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--steps", type=int, default=steps, help=f"denoising steps (default: {steps})")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the pipeline's)")
    parser.add_argument("--prompt", nargs="+", default=None,
                        help="prompts for text-to-image pipelines (default: digit captions)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 for small models on CPU, else torch's default)")


def _positive(name: str, value: float) -> None:
    if value is None or value <= 0:
        raise ValueError(f"{name}={value} must be > 0")


def _load(args: argparse.Namespace):
    import torch

    from .bench import load_pipeline

    _positive("--steps", args.steps)
    print(f"loading {args.model} ...", file=sys.stderr)
    pipe = load_pipeline(args.model, args.device, args.dtype)
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
    _add_model_arguments(parser, steps=20)
    parser.add_argument("--seed", type=int, default=0, help="first seed; image i uses seed + i (default: 0)")
    parser.add_argument("--num-images", type=int, default=8, help="images per method (default: 8)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (default: 3)")
    parser.add_argument("--out", type=Path, default=Path("dualcache-demo"),
                        help="folder for grid.png and results.md (default: ./dualcache-demo)")


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_METHODS, image_grid, run_demo

    _positive("--num-images", args.num_images)
    _positive("--repeats", args.repeats)
    pipe = _load(args)
    with _progress(len(DEMO_METHODS) * (1 + args.repeats), "demo") as bar:
        result = run_demo(pipe, steps=args.steps, seed=args.seed, num_images=args.num_images, repeats=args.repeats,
                          conditions=args.prompt, guidance_scale=args.guidance, progress=bar)
    args.out.mkdir(parents=True, exist_ok=True)
    header = (f"{args.model}: {result.num_images} images (seeds {args.seed}..{args.seed + result.num_images - 1}), "
              f"{result.steps} steps, {args.device} {args.dtype}; wall = median of {args.repeats} interleaved runs\n\n")
    table = header + result.table()
    (args.out / "results.md").write_text(table)
    image_grid(result).save(args.out / "grid.png")
    print(table)
    print(f"wrote {args.out / 'grid.png'} and {args.out / 'results.md'}")
    return 0


# -------------------------------------------------------------------------------------------- bench


def _configure_bench(parser: argparse.ArgumentParser) -> None:
    from .bench import METHOD_ORDER

    _add_model_arguments(parser, steps=20)
    parser.add_argument("--seeds", type=int, default=10,
                        help="seeds per class / prompt; images = seeds x conditions (default: 10)")
    parser.add_argument("--budgets", type=float, nargs="+", default=None,
                        help="target FLOPs reductions (default: 1.5 2 2.5 3 4)")
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                        help=f"subset of: {', '.join(METHOD_ORDER)} (default: all that can run)")
    parser.add_argument("--plan", action="append", default=[], metavar="NAME=PATH",
                        help="add a learned cache plan (JSON) as a method; repeatable")
    parser.add_argument("--classifier", type=Path, default=None,
                        help="digits classifier dir (default: the shipped one; missing -> no FD / accuracy)")
    parser.add_argument("--calibration-seeds", type=int, default=2, help="seeds of the knob search (default: 2)")
    parser.add_argument("--batch-size", type=int, default=50, help="images per pipeline call (default: 50)")
    parser.add_argument("--out", type=Path, default=Path("dualcache-bench"),
                        help="output folder (default: ./dualcache-bench)")
    parser.add_argument("--quick", action="store_true",
                        help="reduced setting: 6 steps, 1 seed, 2 conditions, budget 2x, 5 methods")


QUICK_METHODS = ("uncached", "steps", "fora", "duca", "fbcache")


def _parse_plans(items: Sequence[str]) -> dict[str, Path]:
    from .bench import METHOD_ORDER

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
    from .bench import METHOD_ORDER

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

    _apply_quick(args)
    _positive("--seeds", args.seeds)
    plans = _parse_plans(args.plan)
    check_plan_steps(plans, args.steps)
    wanted, budgets = _selected_methods(args), _budgets(args)
    available = build_methods(args.steps, plans)
    methods = {name: available[name] for name in [*wanted, *plans] if name in available}

    pipe = _load(args)
    conditions = args.prompt or default_conditions(pipe, 2 if args.quick else 10)
    workload = Workload(pipe, args.steps, list(range(args.seeds)), conditions, guidance_scale=args.guidance,
                        batch_size=args.batch_size)
    classifier = metrics.load_classifier(args.classifier)
    if classifier is None:
        print("warning: no digits classifier found: Frechet distance and accuracy are skipped", file=sys.stderr)
    config = BenchConfig(budgets=budgets, calibration_seeds=[1000 + i for i in range(args.calibration_seeds)],
                         calibration_conditions=1 if args.quick else 2)
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
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="METHOD", help="leave these methods out")
    parser.add_argument("--title", default="", help="the table's and plot's title (e.g. the model)")
    parser.add_argument("--images", type=int, default=0, help="images per row, for the header")
    parser.add_argument("--steps", type=int, default=0, help="denoising steps, for the header")


def _run_report(args: argparse.Namespace) -> int:
    from .bench import merge_results, write_reports

    for path in args.csv:
        if not path.is_file():
            raise FileNotFoundError(f"report: no such file {str(path)!r}")
    result = merge_results(args.csv, exclude=args.exclude, num_images=args.images, steps=args.steps,
                           model=args.title)
    paths = write_reports(result, args.out)
    print(paths["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


register_subcommand("demo", "uncached vs DuCa / FORA / ToCa on the same seeds: speed, FLOPs, PSNR / SSIM, a grid",
                    _configure_demo, _run_demo)
register_subcommand("bench", "fidelity benchmark at matched FLOPs budgets: CSV, markdown table, speed-quality plot",
                    _configure_bench, _run_bench)
register_subcommand("report", "merge `dualcache bench` results (CSV) of runs on the same images: one table and plot",
                    _configure_report, _run_report)


if __name__ == "__main__":
    sys.exit(main())
