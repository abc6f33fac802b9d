"""data_tools/inspect_data.py on a generated table with known sizes and captions."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, command, run_ok

INSPECT = str(ROOT / "data_tools" / "inspect_data.py")


def test_the_report_counts_measures_plots_and_shows_samples(tmp_path):
    sizes = [(64, 48), (100, 100), (300, 60), (48, 64)]
    lines = ["text,image_path"]
    for i, size in enumerate(sizes):
        Image.fromarray(np.full((size[1], size[0], 3), 90 + i, np.uint8)).save(tmp_path / f"{i}.jpg")
        lines.append(f"一只小猫第{i}张,{i}.jpg")
    lines += ["没有图片的标题,missing.jpg", ",0.jpg"]
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run_ok(command(INSPECT, str(tmp_path / "pairs.csv"),
                            "--out", str(tmp_path / "report"), "--samples", "3"))
    stats = json.loads((tmp_path / "report" / "stats.json").read_text())
    assert (stats["pairs"], stats["measured"]) == (6, 4)
    assert sum(stats["unreadable"].values()) == 2
    assert stats["image width"]["max"] == 300 and stats["image height"]["min"] == 48
    assert stats["aspect (long / short side)"]["max"] == 5.0
    assert stats["caption characters"]["median"] == 7
    assert Image.open(tmp_path / "report" / "histograms.png").size == (1000, 700)
    page = (tmp_path / "report" / "samples.html").read_text(encoding="utf-8")
    assert page.count("<figure>") == 3 and "一只小猫第" in page
    assert "caption jieba words" in result.stdout


def photo_table(folder, broken: dict[int, bytes]) -> Path:
    """pairs.csv of four photos, those numbered in `broken` holding its bytes instead."""
    lines = ["text,image_path"]
    for i in range(4):
        Image.fromarray(np.full((40, 50 + i, 3), 90 + i, np.uint8)).save(folder / f"{i}.jpg")
        if i in broken:
            (folder / f"{i}.jpg").write_bytes(broken[i])
        lines.append(f"一只小猫第{i}张,{i}.jpg")
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "pairs.csv"


def test_a_sample_image_that_does_not_decode_is_left_off_the_page_and_counted(tmp_path, in_process):
    whole = tmp_path / "whole.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(whole)
    truncated = whole.read_bytes()[:whole.stat().st_size // 2]  # its header still gives the size
    table = photo_table(tmp_path, {1: truncated, 2: b"garbage, not an image"})
    result = in_process(INSPECT, str(table), "--out", str(tmp_path / "report"), "--samples", "10")
    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / "report" / "stats.json").read_text())
    assert (stats["pairs"], stats["measured"], stats["unreadable"]) == (4, 3, {"image header unreadable": 1})
    assert stats["samples that do not decode"] == 1 and "samples that do not decode             1" in result.stdout
    assert (tmp_path / "report" / "samples.html").read_text(encoding="utf-8").count("<figure>") == 2


def test_a_report_that_fails_part_way_leaves_the_earlier_one_whole(tmp_path, in_process, monkeypatch):
    from chinese_clip.data import report

    out = tmp_path / "report"
    assert in_process(INSPECT, str(photo_table(tmp_path, {})), "--out", str(out)).returncode == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    assert sorted(before) == ["histograms.png", "samples.html", "stats.json"]

    def no_plot(stats, path):
        raise RuntimeError("no space left on device")
    monkeypatch.setattr(report, "plot", no_plot)
    with pytest.raises(RuntimeError, match="no space left"):  # on a table whose report would differ
        in_process(INSPECT, str(photo_table(tmp_path, {0: b"garbage"})), "--out", str(out))
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
