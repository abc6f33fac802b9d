"""data_tools/inspect_data.py on a generated table with known sizes and captions."""
import json

import numpy as np
from PIL import Image

from tests.conftest import ROOT, command, run_ok



def test_the_report_counts_measures_plots_and_shows_samples(tmp_path):
    sizes = [(64, 48), (100, 100), (300, 60), (48, 64)]
    lines = ["text,image_path"]
    for i, size in enumerate(sizes):
        Image.fromarray(np.full((size[1], size[0], 3), 90 + i, np.uint8)).save(tmp_path / f"{i}.jpg")
        lines.append(f"一只小猫第{i}张,{i}.jpg")
    lines += ["没有图片的标题,missing.jpg", ",0.jpg"]
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run_ok(command(str(ROOT / "data_tools" / "inspect_data.py"), str(tmp_path / "pairs.csv"),
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
