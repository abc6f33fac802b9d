"""recipes/pretrain.py over parquet shards: broken samples are skipped, counted and logged without
stopping the run, and two ranks killed twice mid-run resume to the uninterrupted result."""
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from chinese_clip.data.shards import build_shards
from chinese_clip.data.synthetic import synthetic_pairs
from tests.test_staged import (LAUNCHERS, ROOT, check_resumed_run_matches, command, kill_twice_then_finish, metrics,
                               run_to_end)
from tests.test_stream import break_rows


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    path = tmp_path_factory.mktemp("shards")
    build_shards(synthetic_pairs(320, 64), path, rows_per_shard=40)
    return path


def on_shards(path, workers=1):
    return ["data.source=shards", f"data.shards=[{{path: {path}}}]", f"data.num_workers={workers}",
            "data.shuffle_buffer=32"]


def test_a_run_over_shards_with_broken_samples_finishes_and_reports_them(tmp_path):
    path = tmp_path / "shards"
    build_shards(synthetic_pairs(80, 64), path, rows_per_shard=20)
    good = pq.read_table(path / "shard-00001.parquet")["image"][0].as_py()
    break_rows(path / "shard-00001.parquet", {3: good[:200], 4: b"", 9: b"<html>404</html>"})
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, str(ROOT / "recipes" / "pretrain.py"), *on_shards(path),
                             "train.steps=6", "data.batch_size=16", "optim.warmup_steps=2", "eval.at_start=false",
                             "checkpoint.every_steps=0", f"run.output_dir={run_dir}"],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = [json.loads(line) for line in (run_dir / "skipped" / "rank-0.jsonl").read_text().splitlines()]
    assert {d["reason"] for d in skipped} == {"does not decode: Image is incomplete or truncated", "empty image",
                                              "does not decode: Unsupported image file"}
    last = metrics(run_dir)[-1 if "data/samples_skipped" in metrics(run_dir)[-1] else -2]
    assert last["data/samples_skipped"] == len(skipped) >= 3  # 96 samples trained: the whole epoch was read
    assert last["data/samples_read"] == 96 + len(skipped)
    assert f"skipped={len(skipped)}" in result.stderr  # the progress bar


@pytest.mark.slow
def test_two_ranks_on_shards_killed_twice_resume_to_the_uninterrupted_run(tmp_path, shards):
    """Each rank's two workers read their own shards; the data positions of both ranks travel in the
    checkpoint, so the resumed run trains on the same samples, crops and batches at every step."""
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    run_to_end(command(uninterrupted, LAUNCHERS["zero2"], batch=8) + on_shards(shards, workers=2))
    kill_twice_then_finish(command(resumed, LAUNCHERS["zero2"], batch=8) + on_shards(shards, workers=2), resumed)
    check_resumed_run_matches(resumed, uninterrupted)
    state = json.loads((resumed / "checkpoints" / "step_16" / "trainer_state.json").read_text())
    assert [sorted(position["workers"]) for position in state["data"]] == [["0", "1"], ["0", "1"]]
