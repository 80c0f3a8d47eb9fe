"""``dualcache train-router`` and ``dualcache plan``.

    from dualcache_diffusers.l2c.cli import add_commands
    add_commands(subparsers)          # each command sets ``func``: call ``args.func(args)`` -> exit code

Importing this module also registers both with the main CLI's ``register_subcommand``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

TRAIN_HELP = "learn a static cache schedule (Learning-to-Cache or the dual compute/partial/reuse router)"
PLAN_HELP = "print a plan's summary and write its heatmap PNG (plan JSON or an L2C authors' router file)"


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train-router`` and ``plan`` on an argparse subparsers object (each sets ``func``)."""
    train = subparsers.add_parser("train-router", help=TRAIN_HELP, description=TRAIN_HELP)
    configure_train(train)
    train.set_defaults(func=run_train)
    plan = subparsers.add_parser("plan", help=PLAN_HELP, description=PLAN_HELP)
    configure_plan(plan)
    plan.set_defaults(func=run_plan)


def configure_train(train: argparse.ArgumentParser) -> None:
    from ..cli import add_model_arguments, finite_float, positive_int

    add_model_arguments(train, steps=20, dtype=False, prompt=False, model_default=None)
    train.add_argument("--budget", type=finite_float, default=0.5,
                       help="target FLOPs fraction of the plan, in (0, 1]; for --kind l2c pass 0 to export by the "
                            "published threshold instead")
    train.add_argument("--out", required=True, help="where to write the plan JSON (required)")
    train.add_argument("--kind", choices=("l2c", "dual"), default="l2c",
                       help="l2c: compute / reuse per branch (published); dual: compute / partial / reuse per module")
    train.add_argument("--iterations", type=positive_int, default=600, help="optimizer steps")
    train.add_argument("--seed", type=int, default=0, help="seed of trajectories, batches and initialisation")
    train.add_argument("--checkpoint", default=None,
                       help="checkpoint directory, written every 100 iterations (default: OUT with .ckpt, deleted "
                            "after a successful run unless --keep-checkpoints; a directory named here is kept)")
    train.add_argument("--keep-checkpoints", action="store_true",
                       help="keep the default checkpoint directory after a successful run (default: delete it)")
    train.add_argument("--resume", default=None, help="continue from this checkpoint directory (default: start anew)")
    train.add_argument("--threshold", type=finite_float, default=None,
                       help="L2C export threshold with --budget 0 (default: 0.1, the published DiT value)")
    train.add_argument("--interval", type=positive_int, default=None,
                       help="cycle length: 1 full step + interval-1 cache steps (default: from the budget, 3 at 0.5; "
                            "2 with --budget 0)")
    train.add_argument("--partial-ratio", type=finite_float, default=0.25,
                       help="fraction of tokens a partial choice recomputes (dual)")
    train.add_argument("--loss-space", choices=["eps", "latent"], default="latent",
                       help="latent (default): the error weighted by where the sampler puts it in the next latent; "
                            "eps: the error of the model output (published)")
    train.add_argument("--forecast-order", type=int, choices=(0, 1), default=None,
                       help="what a cache step's reused branch is, in training and in the plan: 0 the cached "
                            "output (published), 1 the engine's linear forecast from the module's last two "
                            "computations; dual: a partial choice recomputes its rows into that forecast "
                            "(default: 1, which measured better for both kinds)")
    train.add_argument("--lr", type=finite_float, default=1e-2, help="AdamW learning rate on the router logits")
    train.add_argument("--num-images", type=positive_int, default=32, help="data-free trajectories to generate")
    train.add_argument("--batch-size", type=positive_int, default=16, help="trajectory rows per optimizer step")
    train.add_argument("--prompts", default=None,
                       help="text-to-image models: a text file with one prompt per line (default: digit captions)")
    train.add_argument("--png", default=None, help="also write the plan's heatmap to this PNG (default: none)")


def configure_plan(plan: argparse.ArgumentParser) -> None:
    from ..cli import finite_float, positive_int

    plan.add_argument("path", help="plan JSON, or a published L2C router file (.pt / .pth / .bin / .pkl)")
    plan.add_argument("--out", default="dualcache-plan",
                      help="folder for the heatmap PNG (and, for router files, the converted plan JSON), named "
                           "after PATH")
    plan.add_argument("--png", default=None, help="write the heatmap to this path instead (default: OUT/NAME.png)")
    plan.add_argument("--steps", type=positive_int, default=None,
                      help="router files: check the step count (default: no check)")
    plan.add_argument("--threshold", type=finite_float, default=0.1, help="router files: compute threshold")


def print_plan(plan) -> None:
    """A plan's summary with the legend of its letters and symbols."""
    from .._names import PLAN_SUMMARY_LEGEND, STEP_PATTERN_LEGEND

    print(plan.summary())
    print(f"legend: {STEP_PATTERN_LEGEND}.")
    print(f"        {PLAN_SUMMARY_LEGEND}.")


def _remove_checkpoint(directory: Path) -> bool:
    """Delete a checkpoint directory written by the trainer (only its own files; other files keep it)."""
    names = ("router.safetensors", "data.safetensors", "data.json", "state.json", "state.json.tmp")
    if not (directory / "state.json").is_file():
        return False
    for name in names:
        (directory / name).unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:  # the user put something else there: leave it
        return False
    return True


def run_train(args: argparse.Namespace) -> int:
    from ..cli import UserError, check_model_arguments

    ref = check_model_arguments(args)
    if not (0 <= args.budget <= 1):
        raise UserError(f"--budget {args.budget} is not allowed; it must be in (0, 1] (or 0 for the threshold export)")
    prompts = None
    if args.prompts:
        try:
            text = Path(args.prompts).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"--prompts {args.prompts!r}: cannot be read as text ({error})") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise UserError(f"--prompts {args.prompts!r}: the file has no prompts (one per line)")
    if args.resume and not (Path(args.resume) / "state.json").is_file():
        raise FileNotFoundError(f"--resume {args.resume!r}: no router checkpoint (state.json) there")
    out = Path(args.out)
    if out.suffix.lower() != ".json":
        raise UserError(f"--out {args.out!r}: the plan is JSON; name the file *.json")
    checkpoint = Path(args.checkpoint) if args.checkpoint else out.with_suffix(".ckpt")

    from ..cli import load_model
    from .plot import plot_plan
    from .trainer import train_router

    logging.getLogger(__name__).info("loading %s ...", args.model)
    pipe = load_model(ref, args.device)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    budget = args.budget if args.budget > 0 else None
    plan = train_router(
        pipe, num_inference_steps=args.steps, budget=budget, kind=args.kind, iterations=args.iterations,
        seed=args.seed, checkpoint=checkpoint, resume=args.resume, threshold=args.threshold,
        interval=args.interval, partial_ratio=args.partial_ratio, loss_space=args.loss_space,
        forecast_order=args.forecast_order, lr=args.lr,
        num_images=args.num_images, batch_size=args.batch_size, prompts=prompts, progress=True,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    plan.to_json(out)
    print_plan(plan)
    print(f"FLOPs fraction: {plan.metadata.get('flops_fraction', float('nan')):.3f}")
    if args.checkpoint or args.keep_checkpoints:
        print(f"plan written to {out} (checkpoint kept: {checkpoint})")
    else:
        removed = _remove_checkpoint(checkpoint)
        print(f"plan written to {out}" + ("" if removed else f" (checkpoint left in {checkpoint})"))
    if args.png:
        print(f"heatmap written to {plot_plan(plan, args.png)}")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist" if not path.exists() else
                                f"{str(path)!r} is not a file")
    from ..plan import CachePlan
    from .plot import plot_plan
    from .published import load_published_router

    out = Path(args.out)
    if path.suffix in (".pt", ".pth", ".bin", ".pkl"):
        plan = load_published_router(path, num_inference_steps=args.steps, threshold=args.threshold)
        out.mkdir(parents=True, exist_ok=True)
        plan.to_json(out / f"{path.stem}.json")
        print(f"plan written to {out / f'{path.stem}.json'}")
    else:
        plan = CachePlan.from_json(path)
    print_plan(plan)
    png = Path(args.png) if args.png else out / f"{path.stem}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    print(f"heatmap written to {plot_plan(plan, png)}")
    return 0


def _register_with_main_cli() -> None:
    from ..cli import register_subcommand

    register_subcommand("train-router", TRAIN_HELP, configure_train, run_train)
    register_subcommand("plan", PLAN_HELP, configure_plan, run_plan)


_register_with_main_cli()
