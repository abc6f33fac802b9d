"""Data on object storage: an S3-compatible server (moto, in server mode) started on 127.0.0.1, the
credentials and endpoint where AWS's own tools look for them (environment variables), and training,
build_shards and evaluation reading shards and webdataset tars from it as streams."""
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from chinese_clip.checkpoints import save_pretrained
from chinese_clip.config import Config, EvalSetConfig
from chinese_clip.data.readers import read_pairs
from chinese_clip.evaluation.tasks import read_set
from chinese_clip.model import ChineseCLIP
from tests.conftest import EVALUATE, PRETRAIN, TINY, command, error_lines, free_port, metrics, on_shards, run, write_shards, write_tars

SECRET = "not-a-real-secret-key-7f3a"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A running S3 server holding bucket `data` with build_shards' shards (shards/) and img2dataset-style
    tars (tars/00000.tar ... 00003.tar); yields the environment that points AWS clients at it."""
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        import s3fs

        local = tmp_path_factory.mktemp("bucket")
        write_shards(local / "shards", pairs=64, rows_per_shard=16, image_size=32)
        shutil.rmtree(local / "shards" / "quarantine")
        write_tars(local / "tars", pairs=64, per_tar=16, image_size=32, seed=1)
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("data")
        fs.put(str(local / "shards"), "data/shards", recursive=True)
        fs.put(str(local / "tars"), "data/tars", recursive=True)
        yield env
    server.terminate()
    server.wait()


def test_a_run_trains_on_shards_and_tars_mixed_straight_from_s3(s3, tmp_path):
    run_dir = tmp_path / "run"
    sources = "[{path: s3://data/shards}, {path: 's3://data/tars/{00000..00003}.tar'}]"
    result = run(command(PRETRAIN, *on_shards("unused", workers=1), f"data.shards={sources}", "train.steps=4",
                         "data.batch_size=16", "eval.at_start=false", "eval.at_end=false", "checkpoint.every_steps=0",
                         f"run.output_dir={run_dir}"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data: s3://data/shards: 64 pairs in 4 shards" in result.stdout
    assert "data: s3://data/tars/{00000..00003}.tar: 4 webdataset tars" in result.stdout
    assert metrics(run_dir)[-1]["data/samples_read"] == 64 and metrics(run_dir)[-1]["data/samples_skipped"] == 0
    assert SECRET not in result.stdout + result.stderr


def test_a_missing_object_stops_the_run_at_start_up_with_one_line(s3, tmp_path, in_process):
    result = in_process(PRETRAIN, *on_shards("unused", workers=1),
                        "data.shards=[{path: 's3://data/tars/{00000..00009}.tar'}]", f"run.output_dir={tmp_path}")
    assert result.returncode != 0
    assert error_lines(result) == ["error: data.shards: s3://data/tars/00004.tar: no such file or object "
                                   "(and 5 more of the list)"]
    assert SECRET not in result.stdout + result.stderr


def test_build_shards_reads_tars_from_s3(s3):
    pairs = list(read_pairs("s3://data/tars/0000[01].tar"))
    assert len(pairs) == 32 and not any(p.problem for p in pairs)
    assert pairs[0].key == "00000.tar/000000000"


def test_an_evaluation_set_of_shards_on_s3_is_read_like_a_local_one(s3, tmp_path):
    remote = read_set(EvalSetConfig(name="s3", path="s3://data/shards"))
    local = read_set(EvalSetConfig(name="local", path=str(write_shards(tmp_path / "shards", 64, 16, image_size=32))))
    assert remote == local and len(remote.texts) > 32


def test_the_evaluation_recipe_scores_a_set_on_s3(s3, tmp_path, in_process):
    save_pretrained(ChineseCLIP(TINY).state_dict(), Config(model=TINY), tmp_path / "model")
    result = in_process(EVALUATE, "--model", str(tmp_path / "model"), "--retrieval", "s3://data/shards",
                        "--out", str(tmp_path / "out"), "--batch-size", "16")
    assert result.returncode == 0, result.stderr[-2000:]
    scores = json.loads((tmp_path / "out" / "results.json").read_text())["results"]["shards"]
    assert scores["images"] == 64 and SECRET not in result.stdout + result.stderr
