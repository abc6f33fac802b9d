"""data_tools/curate.py: pairs scored by a model's image-text cosine and kept above a threshold, every
dropped input accounted for, the output trained on as shards, an interrupted run resumed."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from chinese_clip.config import DataConfig, ShardSourceConfig
from chinese_clip.data.curate import CurateError, curate, select
from chinese_clip.data.shards import check_parts
from chinese_clip.data.stream import open_sources
from chinese_clip.inference import load_model
from tests.conftest import ROOT, chromium_driver, error_lines, responsive_model, synthetic_pairs, write_tars
from tests.tolerances import FEATURES

CURATE = str(ROOT / "data_tools" / "curate.py")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return responsive_model(tmp_path_factory.mktemp("model") / "model")


def rows(out: Path) -> list[dict]:
    return [row for shard in sorted(out.glob("shard-*.parquet")) for row in pq.read_table(shard).to_pylist()]


def test_the_best_fraction_is_kept_scored_as_the_model_scores_and_every_input_accounted_for(model_dir, tmp_path,
                                                                                          in_process):
    tars = write_tars(tmp_path / "tars", pairs=30, per_tar=10, image_size=48)
    out = tmp_path / "curated"
    common = [CURATE, str(tars), "--model", str(model_dir), "--out", str(out), "--workers", "1", "--num-workers", "0",
              "--rows-per-shard", "8"]
    result = in_process(*common, "--keep-fraction", "0.5")
    assert result.returncode == 0, result.stderr[-2000:]
    kept = rows(out)
    assert len(kept) == 15 and "15 pairs kept" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    dropped = [json.loads(line) for file in sorted((out / "quarantine").glob("*.jsonl"))
               for line in file.read_text().splitlines()]
    assert summary["inputs"] == 30 == summary["written"] + summary["quarantined"] == len(kept) + len(dropped)
    assert min(row["score"] for row in kept) == pytest.approx(summary["threshold"]) and all(
        float(d["reason"].split()[1]) < summary["threshold"] for d in dropped)

    # the score is the model's cosine of the pair, whatever the batch it was computed in
    predictor = load_model(model_dir, batch_size=3)
    images = predictor.encode_images([row["image"] for row in kept])
    texts = predictor.encode_texts([row["caption"] for row in kept])
    assert [row["score"] for row in kept] == pytest.approx((images * texts).sum(dim=1).tolist(), abs=FEATURES)

    # the report: counts that add up, the histogram, and the pairs at the score quantiles shown in a browser
    report = json.loads((out / "report" / "report.json").read_text())
    assert (report["kept"], report["dropped"]) == (15, {"score under the threshold": 15})
    assert report["by_input"] == {f"0000{i}.tar": {"kept": n, "dropped": 10 - n} for i, n in enumerate(
        [sum(row["source"].startswith(f"0000{i}.tar/") for row in kept) for i in range(3)])}
    assert (out / "report" / "scores.png").read_bytes().startswith(b"\x89PNG")
    browser = chromium_driver()
    try:
        browser.get((out / "report" / "examples.html").as_uri())
        notes = [n.text for n in browser.find_elements("css selector", "figcaption small")]
        shown = [float(note.split("score ")[1].split(",")[0]) for note in notes]
        assert len(notes) == 11 and shown == sorted(shown) and shown[-1] == pytest.approx(max(r["score"] for r in kept), abs=5e-5)  # 4 decimals shown
        assert [("kept" in note) for note in notes] == [score >= summary["threshold"] for score in shown]
        assert browser.execute_script("return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    finally:
        browser.quit()

    # training reads the output as shards, and min_score raises the threshold without a rebuild
    [source] = open_sources(DataConfig(source="shards", shards=[ShardSourceConfig(str(out), min_score=0.0)]), 1,
                            lambda _: None)
    assert source.rows == 15

    # another threshold reuses the scores: only the shards are written again
    scores = {p.name: p.stat().st_mtime_ns for p in (out / "work" / "scores").iterdir()}
    result = in_process(*common, "--min-score", str(sorted(row["score"] for row in kept)[-3]))
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(rows(out)) == 3 and {p.name: p.stat().st_mtime_ns for p in (out / "work" / "scores").iterdir()} == scores


def test_an_interrupted_curation_resumes_with_nothing_scored_twice(model_dir, tmp_path):
    predictor = load_model(model_dir)
    encode, calls = predictor.encode_readable, []

    def dies_on_the_third_shard(images):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(len(images))
        return encode(images)

    def run(out: Path, **threshold) -> dict:
        return curate(synthetic_pairs(20, 48), "synthetic", out, model_dir, predictor, rows_per_shard=6, **threshold)

    predictor.encode_readable = dies_on_the_third_shard
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", keep_fraction=0.4)
    with pytest.raises(CurateError, match="is cleaned but not all scored: run the same curate command again"):
        select(tmp_path / "resumed" / "work", tmp_path / "resumed", None, 0.4)
    predictor.encode_readable = lambda images: calls.append(len(images)) or encode(images)
    resumed = run(tmp_path / "resumed", keep_fraction=0.4)
    assert calls == [6, 6, 6, 2]  # shards 0 and 1 before the interruption, 2 and 3 after it
    predictor.encode_readable = encode
    whole = run(tmp_path / "whole", keep_fraction=0.4)
    assert resumed == whole and rows(tmp_path / "resumed") == rows(tmp_path / "whole")
    assert len(rows(tmp_path / "whole")) == math.ceil(0.4 * 20)

    # another model's scores are not reused; another input, or a directory of other files, is refused
    other = tmp_path / "other_model"
    shutil.copytree(model_dir, other)
    (other / "model.safetensors").touch()
    calls.clear()
    predictor.encode_readable = lambda images: calls.append(len(images)) or encode(images)
    curate(synthetic_pairs(20, 48), "synthetic", tmp_path / "whole", other, predictor, rows_per_shard=6, keep_fraction=0.4)
    assert calls == [6, 6, 6, 2]
    with pytest.raises(CurateError, match="holds the curation of synthetic .*curate into another --out"):
        curate(synthetic_pairs(20, 48), "elsewhere", tmp_path / "whole", model_dir, predictor, keep_fraction=0.4)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "shard-00000.parquet").write_bytes(b"a dataset of the user's")
    with pytest.raises(CurateError, match="holds other files: curate into a new directory"):
        run(tmp_path / "mine", keep_fraction=0.4)
    assert (tmp_path / "mine" / "shard-00000.parquet").read_bytes() == b"a dataset of the user's"


def test_what_would_leave_nothing_or_overwrite_the_input_stops_with_one_line(model_dir, tmp_path, in_process):
    tars = write_tars(tmp_path / "tars", pairs=4, per_tar=4, image_size=48)
    base = [CURATE, str(tars), "--model", str(model_dir), "--workers", "1", "--num-workers", "0"]

    def error(*args: str) -> str:
        result = in_process(*args)
        [line] = error_lines(result)  # after the progress bars of the work done, one line and no traceback
        assert result.returncode == 1 and result.stderr.rstrip().endswith(line), result.stderr[-2000:]
        return line

    assert error(*base, "--out", str(tars / "curated"), "--min-score", "0") == (
        f"error: --out {tars / 'curated'} overlaps the source {tars}: curate into a directory of its own")
    assert error(*base, "--out", str(tmp_path / "a"), "--min-score", "2").startswith(
        "error: the threshold 2.0000 keeps none of the 4 pairs (the best scores ")
    assert error(*base, "--out", str(tmp_path / "b"), "--keep-fraction", "1.5") == (
        "error: --keep-fraction must be in (0, 1], got 1.5")
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"not weights")
    assert "broken_model" in error(CURATE, str(tars), "--model", str(broken), "--out", str(tmp_path / "c"),
                                   "--min-score", "0")
    unusable = tmp_path / "unusable.jsonl"
    unusable.write_text("".join(json.dumps({"text": "一只猫", "image_path": f"missing{i}.jpg"}) + "\n" for i in range(3)))
    assert error(CURATE, str(unusable), "--model", str(model_dir), "--out", str(tmp_path / "d"), "--min-score", "0",
                 "--workers", "1") == "error: no usable pairs among the 3 inputs (image file not found 3)"


def test_parts_curated_apart_are_selected_by_one_threshold_over_all_of_them(model_dir, tmp_path, in_process):
    tars = write_tars(tmp_path / "tars", pairs=30, per_tar=6, image_size=48)  # 5 tars: parts of 3 and 2
    out = tmp_path / "parted"
    part = [CURATE, str(tars), "--model", str(model_dir), "--out", str(out), "--workers", "1", "--num-workers", "0"]
    result = in_process(*part, "--part", "0/2")
    assert result.returncode == 0 and "part 0/2 cleaned and scored" in result.stdout, result.stderr[-2000:]
    select = [CURATE, "--select", "--out", str(out), "--keep-fraction", "0.4"]
    assert error_lines(in_process(*select)) == [f"error: {out / 'work' / 'clean'}: part 1/2 is missing (curate --part "
                                                "I/N cleans and scores part I)"]
    assert in_process(*part, "--part", "1/2").returncode == 0
    result = in_process(*select)
    assert result.returncode == 0, result.stderr[-2000:]

    # the same pairs as curating in one piece: the fraction is of the whole input, not of each part
    whole = tmp_path / "whole"
    assert in_process(CURATE, str(tars), "--model", str(model_dir), "--out", str(whole), "--workers", "1",
                      "--num-workers", "0", "--keep-fraction", "0.4").returncode == 0
    kept = sorted(row["source"] for row in rows(out / "part-00000-of-00002") + rows(out / "part-00001-of-00002"))
    assert kept == sorted(row["source"] for row in rows(whole)) and len(kept) == 12
    assert json.loads((out / "summary.json").read_text())["written"] == 12
    [source] = open_sources(DataConfig(source="shards", shards=[ShardSourceConfig(str(out))]), 1, lambda _: None)
    assert source.rows == 12  # training reads the parts as one source
    assert check_parts(out)["inputs"] == 30  # and build_shards --check accounts for every input
