"""run.trackers: the metrics reach the experiment trackers Accelerate knows (wandb here, offline), beside
metrics.jsonl, and a tracker that is unknown or not installed stops the run at start-up."""
import os
import struct
from pathlib import Path

import pytest
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

from chinese_clip.config import ConfigError, load_config
from chinese_clip.runtime import build_accelerator
from tests.conftest import PRETRAIN, command, metrics, run_ok


MISSING = next((name for name in sorted(LOGGER_TYPE_TO_CLASS) if name not in map(str, get_available_trackers())), None)


@pytest.mark.parametrize("tracker, message", [
    ("wandbb", f"run.trackers: unknown tracker 'wandbb' (Accelerate has: {', '.join(sorted(LOGGER_TYPE_TO_CLASS))})"),
    (MISSING, f"run.trackers: {MISSING} is not installed here (pip install {MISSING}), or remove it"),
])
def test_a_tracker_that_cannot_log_stops_the_launch(tracker, message, tmp_path):
    if tracker is None:
        pytest.skip("every tracker Accelerate knows is installed here")
    cfg = load_config(None, [f"run.trackers=[tensorboard,{tracker}]"])
    with pytest.raises(ConfigError) as error:
        build_accelerator(cfg.train, tmp_path, cfg.run.trackers)
    assert str(error.value) == message


def read_wandb_records(path: Path) -> list:
    """The protobuf records of a wandb run file: a 7-byte header (":W&B", magic, version), then the
    records framed as in a LevelDB log (32 KiB blocks; each piece with a 7-byte header: crc, length, kind)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.mark.slow
def test_wandb_gets_the_loss_history_and_metrics_jsonl_is_still_written(tmp_path):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    # wandb's own settings and caches too stay in tmp_path, not the home directory.
    env = {**os.environ, "WANDB_MODE": "offline",
           **{f"WANDB_{kind}DIR": str(tmp_path / f"wandb_{kind.lower()}") for kind in ("", "CONFIG_", "CACHE_", "DATA_")}}
    run_ok(command(PRETRAIN, "train.steps=3", "train.log_every=1", "data.num_workers=0", "data.batch_size=8",
                   "data.synthetic.val_size=16", "eval.at_start=false", "eval.at_end=false", "run.trackers=[wandb]",
                   "run.name=tracked", f"run.output_dir={run_dir}"), env=env)

    [run_file] = (tmp_path / "wandb_").glob("wandb/offline-run-*/run-*.wandb")
    records = read_wandb_records(run_file)
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "tracked"
    history = [{item.key or "/".join(item.nested_key): item.value_json for item in r.history.item} for r in records
               if r.WhichOneof("record_type") == "history"]
    logged = {int(h["_step"]): float(h["train/loss"]) for h in history if "train/loss" in h}
    assert logged == {line["step"]: line["train/loss"] for line in metrics(run_dir) if "train/loss" in line}
    assert sorted(logged) == [1, 2, 3]
    assert not (run_dir / "tensorboard").exists()  # only the trackers listed
