"""How far a benchmark row's margin is outside the spread over images: the default (`duca-budget`) and one
baseline, each re-generated with the setting its `dualcache bench --match-flops` run found, on the same
evaluation images (seeds 0-9 x 10 digits, as the bench), compared image by image.

    python benchmarks/paired_rows.py --model dit --steps 20 --results docs/results/budget/dit --budget 2 \
        --against taylorseer

The `duca-budget` row is the one `benchmarks/budget_table.py` pairs the baseline with (the same budget's row, or
the one `--match-flops` ran nearest the baseline's FLOPs where they are more than 3% apart). Prints both mean
PSNRs (they reproduce the bench's, as each image is generated the same way), the mean per-image difference
(default minus baseline) with its standard error, the median difference, on how many images the default is
better, each method's mean per seed, and the (seed, digit) of the ten images where it falls furthest behind.
One thread.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import budget_table
import numpy as np
import torch

from dualcache_diffusers import metrics
from dualcache_diffusers.bench import Workload, build_methods, default_conditions, generate_with, load_pipeline


def paired_rows(rows: list[dict[str, str]], budget: float, against: str) -> tuple[dict[str, str], dict[str, str]]:
    """(ours, theirs): the baseline's row at ``budget`` and the `duca-budget` row the README's tables pair it with."""
    at = {r["method"]: r for r in rows if r["budget"] and float(r["budget"]) == budget}
    if against not in at or "duca-budget" not in at:
        raise SystemExit(f"error: no {against!r} and 'duca-budget' rows at budget {budget:g} in these results")
    theirs, ours = at[against], at["duca-budget"]
    if budget_table.needs_match(ours, theirs):
        ours = budget_table.ours_at(rows, float(theirs["flops_ratio"]))
    return ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit", help="dit, pixart or a saved pipeline's directory")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--results", type=Path, required=True, help="a `dualcache bench` output directory")
    parser.add_argument("--budget", type=float, required=True, help="the row: 2, 2.5, 3 or 4")
    parser.add_argument("--against", required=True, help="the baseline's method name in the results")
    args = parser.parse_args()

    ours_row, theirs_row = paired_rows(budget_table.read(args.results), args.budget, args.against)
    torch.set_num_threads(1)
    pipe = load_pipeline(args.model)
    workload = Workload(pipe, args.steps, list(range(10)), default_conditions(pipe), guidance_scale=args.guidance,
                        batch_size=50)
    methods = build_methods(args.steps)
    reference = generate_with(methods["uncached"], workload, {}).images
    psnr = {}
    for row in (ours_row, theirs_row):
        images = generate_with(methods[row["method"]], workload, json.loads(row["setting"])).images
        psnr[row["method"]] = metrics.psnr(images, reference)
        print(f"{row['method']} {row['setting']}: {psnr[row['method']].mean():.2f} dB "
              f"(the bench: {float(row['psnr']):.2f} at {float(row['flops_ratio']):.2f}x)", flush=True)
    for method, scores in psnr.items():
        print(f"{method} per seed 0-9 (mean over the digits):", np.round(scores.reshape(10, -1).mean(axis=1), 1))
    diff = psnr["duca-budget"] - psnr[args.against]
    worst = [divmod(int(i), 10) for i in np.argsort(diff)[:10]]
    standard_error = diff.std(ddof=1) / np.sqrt(diff.size)
    print(f"default - {args.against}: {diff.mean():+.2f} dB, standard error {standard_error:.2f}, "
          f"median {np.median(diff):+.2f}; the default is better on {(diff > 0).sum()} of {diff.size} images; "
          f"furthest behind on (seed, digit) {worst}")


if __name__ == "__main__":
    main()
