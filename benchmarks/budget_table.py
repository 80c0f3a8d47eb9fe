"""The README's budget tables from `dualcache bench --match-flops` results: one row per (setting, budget).

    python benchmarks/budget_table.py "DiT=docs/results/budget/dit" "PixArt=docs/results/budget/pixart"

Each cell is PSNR dB vs uncached (achieved FLOPs ratio of the whole pipeline; `*`: more than 10% off the budget).
Where a baseline landed more than 3% from `duca-budget`'s row at the same budget, "/ ours" adds the `duca-budget`
row that `--match-flops` ran nearest that baseline's FLOPs. Below the table: per row, the best baseline against
ours at its FLOPs (dB).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

BUDGETS = (2.0, 2.5, 3.0, 4.0)
COLUMNS = ("calibrated", "taylorseer", "seacache", "fora", "steps", "dbcache", "dbcache-taylorseer", "dbcache-foca")
HEADER = ("| {label} | budget | **duca-budget** (default) | calibrated | TaylorSeer | SeaCache | FORA | fewer steps "
          "| DBCache | DBCache + TaylorSeer | DBCache + FoCa |\n|---|---|---|---|---|---|---|---|---|---|---|")
MATCH_TOLERANCE = 0.03


def read(directory: Path) -> list[dict[str, str]]:
    with open(directory / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def cell(row: dict[str, str]) -> str:
    """PSNR (FLOPs ratio), the ratio starred where the method landed more than 10% off its budget (as bench does)."""
    star = "" if row.get("reached", "True") == "True" else " *"
    return f"{float(row['psnr']):.2f} ({float(row['flops_ratio']):.2f}x{star})"


def ours_at(rows: list[dict[str, str]], ratio: float) -> dict[str, str]:
    """The duca-budget row whose achieved FLOPs ratio is nearest ``ratio``."""
    ours = [r for r in rows if r["method"] == "duca-budget"]
    return min(ours, key=lambda r: abs(float(r["flops_ratio"]) - ratio))


def needs_match(ours: dict[str, str], theirs: dict[str, str]) -> bool:
    """Whether a baseline's row landed more than 3% from the same budget's `duca-budget` row, so that it is compared
    with the one `--match-flops` ran nearest its FLOPs (:func:`ours_at`) instead."""
    return abs(float(theirs["flops_ratio"]) / float(ours["flops_ratio"]) - 1) > MATCH_TOLERANCE


def table(settings: list[tuple[str, Path]], label: str) -> tuple[list[str], list[str]]:
    lines, verdicts = [HEADER.format(label=label)], []
    for name, directory in settings:
        rows = read(directory)
        for budget in BUDGETS:
            at = {r["method"]: r for r in rows if r["budget"] and float(r["budget"]) == budget}
            if "duca-budget" not in at:
                continue
            ours = at["duca-budget"]
            cells, best = [cell(ours)], None
            for method in COLUMNS:
                theirs = at.get(method)
                if theirs is None:
                    cells.append("-")
                    continue
                ratio = float(theirs["flops_ratio"])
                text, pair = cell(theirs), ours
                if method != "calibrated" and needs_match(ours, theirs):
                    pair = ours_at(rows, ratio)
                    text += f" / ours {cell(pair)}"
                cells.append(text)
                if method != "calibrated":
                    margin = float(pair["psnr"]) - float(theirs["psnr"])
                    if best is None or margin < best[0]:
                        best = (margin, method, ratio)
            lines.append(f"| {name} | {budget:g}x | " + " | ".join(cells) + " |")
            if best is not None:
                verdict = "wins" if best[0] > 0.05 else ("ties" if best[0] >= -0.05 else "loses")
                verdicts.append(f"{name} {budget:g}x: {verdict} by {best[0]:+.2f} dB against {best[1]} "
                                f"({best[2]:.2f}x)")
    return lines, verdicts


def setting(text: str) -> tuple[str, Path]:
    """NAME=DIRECTORY, the directory holding a results.csv."""
    name, sep, directory = text.partition("=")
    if not sep or not name or not (Path(directory) / "results.csv").is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=DIRECTORY with a results.csv in DIRECTORY")
    return name, Path(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="+", type=setting,
                        help="NAME=DIRECTORY of a `dualcache bench --match-flops` run")
    parser.add_argument("--label", default="model", help="the first column's header")
    args = parser.parse_args()
    lines, verdicts = table(args.settings, args.label)
    print("\n".join(lines))
    print()
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
