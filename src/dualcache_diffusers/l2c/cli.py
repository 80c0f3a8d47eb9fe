"""``dualcache train-router`` and ``dualcache plan``.

    from dualcache_diffusers.l2c.cli import add_commands
    add_commands(subparsers)          # each command sets ``func``: call ``args.func(args)`` -> exit code

Importing this module also registers both with the main CLI's ``register_subcommand``.
"""

from __future__ import annotations

import argparse
import sys
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
    train.add_argument("--model", required=True,
                       help="'dit' / 'pixart' (the shipped reference models), a pipeline directory or a Hub repo id")
    train.add_argument("--steps", type=int, default=20, help="num_inference_steps the plan is for (default 20)")
    train.add_argument("--budget", type=float, default=0.5,
                       help="target FLOPs fraction of the plan, in (0, 1] (default 0.5); "
                            "for --kind l2c pass 0 to export by the published threshold instead")
    train.add_argument("--out", required=True, help="where to write the plan JSON")
    train.add_argument("--kind", choices=("l2c", "dual"), default="l2c")
    train.add_argument("--iterations", type=int, default=600)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--checkpoint", default=None, help="checkpoint directory (default: OUT.ckpt)")
    train.add_argument("--resume", default=None, help="continue from this checkpoint directory")
    train.add_argument("--threshold", type=float, default=None, help="L2C export threshold (with --budget 0)")
    train.add_argument("--interval", type=int, default=None, help="cycle length: 1 full step + interval-1 cache")
    train.add_argument("--partial-ratio", type=float, default=0.25, help="tokens a partial choice recomputes")
    train.add_argument("--loss-space", choices=["eps", "latent"], default="eps",
                       help="eps: error of the model output (published); latent: weighted by where the "
                            "sampler puts it in the next latent (default: eps)")
    train.add_argument("--lr", type=float, default=1e-2)
    train.add_argument("--num-images", type=int, default=32, help="data-free trajectories to generate")
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--prompts", default=None, help="PixArt: a text file with one prompt per line")
    train.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    train.add_argument("--png", default=None, help="also write the plan's heatmap here")


def configure_plan(plan: argparse.ArgumentParser) -> None:
    plan.add_argument("path", help="plan JSON, or a published L2C router file")
    plan.add_argument("--png", default=None, help="heatmap path (default: PATH with .png)")
    plan.add_argument("--steps", type=int, default=None, help="router files: check the step count")
    plan.add_argument("--threshold", type=float, default=0.1, help="router files: compute threshold (default 0.1)")
    plan.add_argument("--out", default=None, help="router files: also write the plan JSON here")


def run_train(args: argparse.Namespace) -> int:
    import torch
    from diffusers import DiffusionPipeline

    from ..bench import resolve_model
    from .plot import plot_plan
    from .trainer import train_router

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = DiffusionPipeline.from_pretrained(resolve_model(args.model)).to(device)
    pipe.set_progress_bar_config(disable=True)
    prompts = None
    if args.prompts:
        prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    budget = args.budget if args.budget > 0 else None
    out = Path(args.out)
    checkpoint = args.checkpoint or str(out.with_suffix(".ckpt"))
    plan = train_router(
        pipe, num_inference_steps=args.steps, budget=budget, kind=args.kind, iterations=args.iterations,
        seed=args.seed, checkpoint=checkpoint, resume=args.resume, threshold=args.threshold,
        interval=args.interval, partial_ratio=args.partial_ratio, loss_space=args.loss_space, lr=args.lr,
        num_images=args.num_images, batch_size=args.batch_size, prompts=prompts, progress=True,
    )
    plan.to_json(out)
    print(plan.summary())
    print(f"FLOPs fraction: {plan.metadata.get('flops_fraction', float('nan')):.3f}")
    print(f"plan written to {out} (checkpoint: {checkpoint})")
    if args.png:
        print(f"heatmap written to {plot_plan(plan, args.png)}")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from ..plan import CachePlan
    from .plot import plot_plan
    from .published import load_published_router

    path = Path(args.path)
    if not path.is_file():
        print(f"error: {path} does not exist", file=sys.stderr)
        return 2
    if path.suffix in (".pt", ".pth", ".bin", ".pkl"):
        plan = load_published_router(path, num_inference_steps=args.steps, threshold=args.threshold)
        if args.out:
            plan.to_json(args.out)
            print(f"plan written to {args.out}")
    else:
        plan = CachePlan.from_json(path)
    print(plan.summary())
    png = Path(args.png) if args.png else path.with_suffix(".png")
    print(f"heatmap written to {plot_plan(plan, png)}")
    return 0


def _register_with_main_cli() -> None:
    from ..cli import register_subcommand

    register_subcommand("train-router", TRAIN_HELP, configure_train, run_train)
    register_subcommand("plan", PLAN_HELP, configure_plan, run_plan)


_register_with_main_cli()
