"""The README's budget tables pair each baseline with the default's row at the same FLOPs: budget_table.py and
paired_rows.py (which re-generates such a pair image by image) must pick the same row."""

from __future__ import annotations

import csv

import pytest
from repo_files import load_repo_file

budget_table = load_repo_file("benchmarks/budget_table.py", "budget_table")
paired = load_repo_file("benchmarks/paired_rows.py", "paired_rows")


def _row(method: str, budget: float, ratio: float, psnr: float) -> dict[str, str]:
    return {"method": method, "budget": str(budget), "flops_ratio": str(ratio), "psnr": str(psnr),
            "setting": "{}", "reached": "True"}


ROWS = [
    _row("duca-budget", 2.0, 2.007, 39.35),
    _row("taylorseer", 2.0, 2.06, 40.50),  # 2.6% from ours: paired with the same budget's row
    _row("seacache", 2.0, 2.20, 34.85),  # 9.6% from ours: paired with the row --match-flops ran at 2.20x
    _row("duca-budget", 1.916, 1.911, 40.38),
    _row("duca-budget", 2.201, 2.195, 37.87),
]


@pytest.fixture
def results(tmp_path):
    with open(tmp_path / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(ROWS[0]))
        writer.writeheader()
        writer.writerows(ROWS)
    return tmp_path


@pytest.mark.parametrize("against, ours_psnr", [("taylorseer", 39.35), ("seacache", 37.87)])
def test_paired_rows_pairs_a_baseline_as_the_readme_table_does(results, against, ours_psnr):
    ours, theirs = paired.paired_rows(budget_table.read(results), 2.0, against)
    assert theirs["method"] == against and float(ours["psnr"]) == ours_psnr
    lines, verdicts = budget_table.table([("DiT", results)], "setting")
    # the table's cell for this baseline ends with the pair's "/ ours" cell where they were more than 3% apart
    expected = budget_table.cell(theirs) + ("" if against == "taylorseer" else f" / ours {budget_table.cell(ours)}")
    assert f"| {expected} |" in lines[1]
    # the margins line names the row's worst margin: TaylorSeer's, -1.15 dB against the same budget's row
    assert verdicts == ["DiT 2x: loses by -1.15 dB against taylorseer (2.06x)"]


def test_paired_rows_refuses_a_row_that_is_not_in_the_results():
    with pytest.raises(SystemExit, match="no 'fora' and 'duca-budget' rows at budget 2"):
        paired.paired_rows(ROWS, 2.0, "fora")
