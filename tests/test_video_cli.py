"""`dualcache demo --model video` / `dualcache bench --model video` on the shipped moving-digits LattePipeline."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from PIL import Image

from dualcache_diffusers import cli, metrics
from dualcache_diffusers.bench import BenchResult, BenchRow, Quality, markdown_table, read_csv, write_csv

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread (conftest)


def _table_rows(markdown: str, key: int = 0) -> dict[str, list[str]]:
    """The rows of the markdown table by the cell in column ``key`` (the method)."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return {row[key]: row for row in rows[1:]}


def test_demo_video_writes_an_animated_gif_of_every_method(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--model", "video", "--steps", "6", "--num-images", "2", "--repeats", "1", "--out", str(out)]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "video: 2 clips of 8 frames" in printed
    rows = _table_rows(printed)
    assert list(rows) == ["uncached", "duca", "fora", "toca"]
    assert rows["uncached"][5] == "inf" and rows["uncached"][7] == "inf"  # PSNR, temporal PSNR
    for method in ("duca", "fora", "toca"):
        assert float(rows[method][2].rstrip("x")) > 1.2, rows[method]  # FLOPs speedup
        assert 0 < float(rows[method][5]) < 100 and 0 < float(rows[method][7]) < 100, rows[method]
    assert f"wrote {out / 'clips.gif'}" in printed

    gif = Image.open(out / "clips.gif")
    assert gif.n_frames == 8 and gif.info["loop"] == 0
    first = np.asarray(gif.convert("RGB"))
    gif.seek(7)
    assert np.abs(np.asarray(gif.convert("RGB")).astype(int) - first).mean() > 0.5  # the clips move
    grid = Image.open(out / "grid.png")
    assert grid.height > 4 * 8 * 32 and grid.width > 2 * 32  # 4 methods x 8-frame strips, 2 captions


def test_bench_video_quick_fills_the_temporal_column(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "--model", "video", "--quick", "--methods", "uncached", "fora", "duca", "--out", str(out)]
    assert cli.main(args) == 0
    with (out / "results.csv").open() as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["uncached", "fora", "duca"]
    assert rows["uncached"]["temporal_psnr"] == "inf" and rows["uncached"]["psnr"] == "inf"
    for method in ("fora", "duca"):
        row = rows[method]
        assert float(row["flops_ratio"]) > 1.3, row
        assert math.isfinite(float(row["temporal_psnr"])) and 0 < float(row["temporal_psnr"]) < 100, row
        assert math.isfinite(float(row["psnr"])) and -1 <= float(row["ssim"]) <= 1
    markdown = (out / "results.md").read_text()
    assert "2 clips x 8 frames, 6 steps" in markdown and "temporal PSNR dB" in markdown
    fora = _table_rows(markdown, key=1)["fora"]
    assert fora[7].endswith("(n/m)") and "FD / acc (n/m) = not meaningful for clips" in markdown
    assert len(fora) == 10 and float(fora[8]) == pytest.approx(float(rows["fora"]["temporal_psnr"]), abs=0.01)
    assert [r.quality.temporal_psnr for r in read_csv(out / "results.csv")][1:] == [
        float(rows["fora"]["temporal_psnr"]), float(rows["duca"]["temporal_psnr"])]


def test_image_results_leave_the_temporal_column_blank(tmp_path):
    rows = [BenchRow("uncached", None, {}, 1.0, 1.0, Quality(math.inf, 1.0), "FF"),
            BenchRow("fora", 2.0, {"interval": 2}, 1.9, 1.9, Quality(30.0, 0.9), "FA")]
    write_csv(BenchResult(rows, {}, num_images=4, steps=2), tmp_path / "results.csv")
    with (tmp_path / "results.csv").open() as handle:
        assert [row["temporal_psnr"] for row in csv.DictReader(handle)] == ["", ""]
    assert "temporal" not in markdown_table(BenchResult(rows, {}, num_images=4, steps=2))
    # results.csv files written before the column existed still read
    old = tmp_path / "old.csv"
    lines = (tmp_path / "results.csv").read_text().splitlines()
    header = lines[0].split(",")
    drop = header.index("temporal_psnr")
    old.write_text("\n".join(",".join(c for i, c in enumerate(line.split(",")) if i != drop) for line in lines))
    assert [r.quality.temporal_psnr for r in read_csv(old)] == [None, None]


def test_fidelity_of_clips_separates_static_errors_from_temporal_ones():
    rng = np.random.default_rng(0)
    clips = rng.integers(50, 200, size=(2, 4, 8, 8, 3)) / 256  # exact in floating point
    static = clips + 1 / 16  # the same error in every frame: frames differ, frame-to-frame changes do not
    scores = metrics.fidelity(static, clips)
    assert scores["psnr"] == pytest.approx(10 * math.log10(16**2))
    assert scores["temporal_psnr"] == math.inf and scores["ssim"] < 1.0
    flicker = clips + (np.arange(4) % 2)[None, :, None, None, None] / 16  # the error alternates
    assert math.isfinite(metrics.fidelity(flicker, clips)["temporal_psnr"])
    images = metrics.fidelity(clips[:, 0], clips[:, 0])  # images: no temporal PSNR
    assert images == {"psnr": math.inf, "ssim": pytest.approx(1.0), "temporal_psnr": None}
