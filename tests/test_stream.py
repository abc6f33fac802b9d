"""Training from parquet shards and webdataset tars: every sample once per epoch across ranks and workers, a resume that
continues the exact sample sequence (ids and crops), weighted mixing, undecodable samples skipped
and counted up to a limit (in a whole run too), and every start-up error a user can make with shard
paths. (Two ranks on shards, killed and resumed: tests/test_staged.py, under ZeRO-2.)"""
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as legacy

from chinese_clip.config import ConfigError, DataConfig, ShardSourceConfig
from chinese_clip.data.loaders import build_train_loader
from chinese_clip.data.stream import DataError, open_sources
from chinese_clip.data.transforms import build_transform, decode
from chinese_clip.tokenizer import load_tokenizer
from tests.conftest import (PRETRAIN, animated, break_rows, command, decompression_bomb, metrics, on_shards, run,
                            write_shards, write_tars)

TOKENIZER = load_tokenizer(None, 16)


def make_shards(path, shards=4, rows=10, seed=0):
    return write_shards(path, shards * rows, rows, image_size=32, seed=seed)


def data_cfg(*paths, **overrides):
    weights = overrides.pop("weights", [1.0] * len(paths))
    fields = dict(source="shards", shards=[ShardSourceConfig(str(p), w) for p, w in zip(paths, weights)],
                  batch_size=4, num_workers=2, shuffle_buffer=8, context_length=16)
    return DataConfig(**(fields | overrides))


def loader(cfg, rank=0, world_size=1, position=None, skip_log=None):
    return build_train_loader(cfg, TOKENIZER, 32, rank=rank, world_size=world_size, seed=0, position=position,
                              sources=open_sources(cfg, world_size, say=lambda _: None), skip_log=skip_log)


def take(batches, n):
    """n batches: the ids and pixels of each, and the position after them."""
    out = [(next(batches), list(batches.last_ids)) for _ in range(n)]
    return [ids for _, ids in out], [batch["pixel_values"] for batch, _ in out], batches.position


def all_ids(path, source=0):
    return sorted(f"{source}:{row['id']}" for shard in sorted(path.glob("shard-*.parquet")) for row in pq.read_table(shard).to_pylist())


def test_two_ranks_with_two_workers_each_read_every_sample_once_per_epoch(tmp_path):
    shards = make_shards(tmp_path / "a", shards=8, rows=10)
    cfg = data_cfg(shards)
    # each of the 4 readers holds 2 shards, 20 samples: 5 batches of 4, alternating between its rank's workers
    ids = [i for rank in (0, 1) for batch in take(loader(cfg, rank, world_size=2), 10)[0] for i in batch]
    assert sorted(ids) == all_ids(shards)
    batch = next(loader(cfg))
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["input_ids"].shape == (4, 16)
    assert batch["image_id"].unique().numel() == 4


def test_a_resumed_loader_continues_the_exact_sequence_of_samples_and_crops(tmp_path):
    shards = make_shards(tmp_path / "a", shards=4, rows=10)
    cfg = data_cfg(shards)
    ids, pixels, _ = take(loader(cfg), 14)  # two workers x 20 samples: the second epoch starts at batch 11
    first_ids, first_pixels, position = take(loader(cfg), 5)  # killed here: worker 0 is a batch ahead
    json.dumps(position)  # it goes into trainer_state.json
    rest_ids, rest_pixels, _ = take(loader(cfg, position=position), 9)
    assert first_ids + rest_ids == ids
    assert all(torch.equal(a, b) for a, b in zip(first_pixels + rest_pixels, pixels))
    epoch = [i for batch in (first_ids + rest_ids)[:10] for i in batch]
    assert sorted(epoch) == all_ids(shards)  # each sample of the epoch exactly once, across the kill
    assert [i for batch in ids[10:] for i in batch] != epoch[:16]  # the next epoch is shuffled anew


def test_crops_follow_the_sample_not_the_reader_and_leave_the_global_rng_alone(tmp_path):
    shards = make_shards(tmp_path / "a", shards=2, rows=10)
    cfg = data_cfg(shards, num_workers=0, crop_scale=(0.3, 0.5))
    state = torch.get_rng_state()
    ids, pixels, _ = take(loader(cfg), 5)
    assert torch.equal(torch.get_rng_state(), state)  # dropout and FLIP masks draw from it
    other_ids, other_pixels, _ = take(loader(cfg, rank=1, world_size=2), 2)  # its epoch 0: one shard of 10
    by_id = {i: p for batch_ids, batch in zip(ids, pixels) for i, p in zip(batch_ids, batch)}
    for batch_ids, batch in zip(other_ids, other_pixels):
        for i, p in zip(batch_ids, batch):
            assert torch.equal(p, by_id[i])


def test_the_resize_transform_is_chinese_clips_square_bicubic(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8))
    data = io.BytesIO()
    image.save(data, format="PNG")
    ours = build_transform(DataConfig(transform="resize"), 32)(decode(data.getvalue()))
    theirs = legacy.pil_to_tensor(legacy.resize(image, [32, 32], InterpolationMode.BICUBIC))  # cn_clip's eval transform
    assert ours.shape == theirs.shape == (3, 32, 32) and ours.dtype == torch.uint8
    # PIL and tensor bicubic round differently: at most one grey level (measured: 0.003 on average); a
    # wrong filter, size or channel order differs by tens
    assert (ours.float() - theirs.float()).abs().mean() < 3


def test_sources_mix_by_weight_and_a_small_one_repeats(tmp_path):
    big, small = make_shards(tmp_path / "big", shards=2, rows=40), make_shards(tmp_path / "small", 2, 5, seed=1)
    cfg = data_cfg(big, small, weights=[3.0, 1.0], num_workers=0)
    ids = [i for batch in take(loader(cfg), 50)[0] for i in batch]
    from_small = Counter(i for i in ids if i.startswith("1:"))
    share = sum(from_small.values()) / 200
    assert 0.17 < share < 0.33, share  # 1/4 expected; binomial sd 0.03
    assert set(from_small) == set(all_ids(small, source=1)) and max(from_small.values()) > 1


def test_undecodable_samples_are_skipped_counted_and_logged(tmp_path):
    shards = make_shards(tmp_path / "a", shards=2, rows=10)
    shard = shards / "shard-00000.parquet"
    ids = [row["id"] for row in pq.read_table(shard).to_pylist()]
    good = pq.read_table(shard).to_pylist()[0]["image"]
    break_rows(shard, {2: good[:len(good) // 2], 5: b"<html>not found</html>"})
    cfg = data_cfg(shards, num_workers=1)
    log = tmp_path / "skipped" / "rank-0.jsonl"
    batches = loader(cfg, skip_log=log)
    read = [i for batch in take(batches, 5)[0] for i in batch]  # the epoch's 18 good samples and 2 of the next
    assert f"0:{ids[2]}" not in read and f"0:{ids[5]}" not in read
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert {d["id"]: d["reason"] for d in lines} == {ids[2]: "truncated or corrupt: Truncated File Read",
                                                     ids[5]: "not an image"}
    assert batches.counts == {"read": 20 + len(lines), "skipped": len(lines), "filtered": 0}  # the next epoch may hit them again


def test_too_many_undecodable_samples_stop_the_run_with_the_reason(tmp_path):
    shards = make_shards(tmp_path / "a", shards=2, rows=10)
    break_rows(shards / "shard-00001.parquet", {i: b"" for i in range(4)})
    cfg = data_cfg(shards, num_workers=0, max_bad_fraction=0.1, bad_check_after=12)
    with pytest.raises(DataError, match=r"of the \d+ samples .* data.max_bad_fraction=0.1 .*empty file"):
        take(loader(cfg), 10)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "shard-00001.parquet").unlink(), "missing shard-00001.parquet"),
    (lambda d: (d / "shard-00003.parquet").unlink(), "build_shards wrote 40 pairs, the shards hold 30"),
    (lambda d: (d / "shard-00002.parquet.partial").write_bytes(b""), "did not finish"),
    (lambda d: (d / "shard-00002.parquet").write_bytes(b"PAR1 nonsense"), "not a readable parquet file"),
    (lambda d: pq.write_table(pa.table({"text": ["x"]}), d / "shard-00002.parquet"), "has no id, caption, image"),
])
def test_a_damaged_shard_directory_is_refused_at_start_up(tmp_path, damage, message):
    shards = make_shards(tmp_path / "a")
    damage(shards)
    with pytest.raises(ConfigError, match=message):
        open_sources(data_cfg(shards), world_size=1, say=lambda _: None)


def test_shard_paths_and_counts_are_checked_at_start_up(tmp_path):
    shards = make_shards(tmp_path / "a", shards=3)
    quiet = lambda _: None  # noqa: E731
    with pytest.raises(ConfigError, match="no such file or directory"):
        open_sources(data_cfg(tmp_path / "nowhere"), 1, quiet)
    with pytest.raises(ConfigError, match="matches no file"):
        open_sources(data_cfg(tmp_path / "a" / "*.arrow"), 1, quiet)
    with pytest.raises(ConfigError, match="3 shards hold rows, but 4 readers"):
        open_sources(data_cfg(shards), 2, quiet)  # 2 ranks x 2 workers
    [source] = open_sources(data_cfg(tmp_path / "a" / "shard-0000[12].parquet"), 1, quiet)
    assert (len(source.files), source.rows) == (2, 20)
    said = []
    open_sources(data_cfg(shards, num_workers=1), 2, said.append)
    assert said[-1].startswith("data: 3 shards are not a multiple of 2 ranks: every rank reads all of them")


def test_a_position_from_another_layout_is_refused_unless_reset(tmp_path):
    shards = make_shards(tmp_path / "a", shards=4)
    _, _, position = take(loader(data_cfg(shards)), 3)
    with pytest.raises(ConfigError, match="another data layout"):
        loader(data_cfg(shards, num_workers=1), position=position)
    fresh = take(loader(data_cfg(shards, num_workers=1)), 2)[0]
    assert take(loader(data_cfg(shards, num_workers=1, reset_position=True), position=position), 2)[0] == fresh


def test_a_run_over_shards_with_broken_samples_finishes_and_reports_them(tmp_path):
    path = write_shards(tmp_path / "shards", pairs=80, rows_per_shard=20)
    good = pq.read_table(path / "shard-00001.parquet")["image"][0].as_py()
    break_rows(path / "shard-00001.parquet", {3: good[:200], 4: b"", 9: b"<html>404</html>"})
    run_dir = tmp_path / "run"
    result = run(command(PRETRAIN, *on_shards(path, workers=1), "train.steps=6", "data.batch_size=16", "optim.warmup_steps=2",
                         "eval.at_start=false", "checkpoint.every_steps=0", f"run.output_dir={run_dir}"))
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = [json.loads(line) for line in (run_dir / "skipped" / "rank-0.jsonl").read_text().splitlines()]
    assert {d["reason"] for d in skipped} == {"truncated or corrupt: Truncated File Read", "empty file", "not an image"}
    last = metrics(run_dir)[-1 if "data/samples_skipped" in metrics(run_dir)[-1] else -2]
    assert last["data/samples_skipped"] == len(skipped) >= 3  # 96 samples trained: the whole epoch was read
    assert last["data/samples_read"] == 96 + len(skipped)
    assert f"skipped={len(skipped)}" in result.stderr  # the progress bar


def tar_ids(path: Path, source: int = 0) -> list[str]:
    return sorted(f"{source}:{tar.name}/{member.name.split('.')[0]}" for tar in sorted(path.glob("*.tar"))
                  for member in tarfile.open(tar) if member.name.endswith(".jpg"))


def test_webdataset_tars_stream_like_shards_filtered_by_build_shards_rules_and_resume_exactly(tmp_path):
    tars = write_tars(tmp_path / "tars", pairs=32, per_tar=8, image_size=32)
    cfg = data_cfg(tars)
    ids = [i for rank in (0, 1) for batch in take(loader(cfg, rank, world_size=2), 4)[0] for i in batch]
    assert sorted(ids) == tar_ids(tars)  # each of the 4 readers holds one tar: every sample once per epoch
    whole, whole_pixels, _ = take(loader(cfg), 12)
    first, first_pixels, position = take(loader(cfg), 5)
    rest, rest_pixels, _ = take(loader(cfg, position=position), 7)
    assert first + rest == whole and all(torch.equal(a, b) for a, b in zip(first_pixels + rest_pixels, whole_pixels))

    # raw web data: an English caption, an image without caption, a tar cut inside an image, a decompression
    # bomb (a dataloader worker decoding it would be killed for memory) and an animated GIF named .jpg
    usable = set(tar_ids(tars)) - {f"0:00003.tar/0000000{i}" for i in range(27, 32)} | {"0:00001.tar/animated"}

    def add(tar: Path, name: str, data: bytes) -> None:
        with tarfile.open(tar, "a") as archive:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    add(tars / "00001.tar", "english.jpg", b"not read")
    add(tars / "00001.tar", "english.txt", b"a photo of a cat")
    add(tars / "00002.tar", "lonely.jpg", b"not read")
    add(tars / "00002.tar", "bomb.png", decompression_bomb())
    add(tars / "00002.tar", "bomb.txt", "一张黑色的图片".encode())
    add(tars / "00001.tar", "animated.jpg", animated(size=64))
    add(tars / "00001.tar", "animated.txt", "一个红色的方块".encode())
    data = (tars / "00003.tar").read_bytes()
    (tars / "00003.tar").write_bytes(data[:data.index(b"000000027.jpg") + 600])
    log = tmp_path / "skipped.jsonl"
    batches = loader(data_cfg(tars, num_workers=1, bad_check_after=10_000), skip_log=log)
    trained = [i for batch in take(batches, 8)[0] for i in batch]  # 28 usable pairs an epoch: into the second
    assert set(trained) == usable
    reasons = {d["id"]: d["reason"] for d in map(json.loads, log.read_text().splitlines())}
    assert reasons == {"00001.tar/english": "no Chinese characters",  # filtered, as build_shards would
                       "00002.tar/lonely": "no caption (.txt or .json)",
                       "00002.tar/bomb": "decompression bomb: Image size (400000000 pixels) exceeds limit of "
                                         "178956970 pixels, could be decompression bomb DOS attack.",
                       "00003.tar/000000026+": "tar cut short or corrupt after 000000026: unexpected end of data"}
    lines = log.read_text().splitlines()
    filtered = sum("no Chinese" in line for line in lines)
    assert batches.counts == {"read": len(trained) + len(lines), "skipped": len(lines) - filtered, "filtered": filtered}
    # the skipped ones are bad samples and count towards the limit; the filtered one does not
    with pytest.raises(DataError, match=r"2 of the \d+ samples .* data.max_bad_fraction=0.05 .*: no caption .* Tars hold"):
        take(loader(data_cfg(tars, num_workers=1, bad_check_after=29, max_bad_fraction=0.05)), 8)


def test_min_score_trains_only_on_pairs_scoring_at_least_it_and_logs_the_rest(tmp_path):
    shards = make_shards(tmp_path / "a", shards=4, rows=10)
    scores = {}
    for shard in sorted(shards.glob("shard-*.parquet")):  # as data_tools/curate.py writes them: a score per row
        table = pq.read_table(shard)
        column = [round(0.1 * (i % 10), 1) for i in range(table.num_rows)]
        scores |= {f"0:{row_id}": score for row_id, score in zip(table.column("id").to_pylist(), column)}
        pq.write_table(table.append_column("score", pa.array(column, pa.float32())), shard)
    log = tmp_path / "skipped.jsonl"
    cfg = data_cfg(shards, num_workers=1)
    cfg.shards[0].min_score = 0.5
    batches = loader(cfg, skip_log=log)
    read = [i for batch in take(batches, 5)[0] for i in batch]  # the 20 pairs scoring 0.5 or more: one epoch
    assert sorted(read) == sorted(i for i, score in scores.items() if score >= 0.5)
    filtered = [json.loads(line) for line in log.read_text().splitlines()]
    assert {d["reason"] for d in filtered} == {f"score {s:.4f} under min_score 0.5" for s in (0.0, 0.1, 0.2, 0.3, 0.4)}
    assert batches.counts["filtered"] == len(filtered) and batches.counts["skipped"] == 0

    # another threshold continues from the same position: it filters rows after they are read
    _, _, position = take(loader(cfg), 2)
    cfg.shards[0].min_score = 0.8
    assert all(scores[i] >= 0.8 for batch in take(loader(cfg, position=position), 2)[0] for i in batch)

    with pytest.raises(ConfigError, match="has no score column; training reads the shards that data_tools/curate.py"):
        open_sources(DataConfig(source="shards", shards=[ShardSourceConfig(str(make_shards(tmp_path / "b")), min_score=0.5)]),
                     1, lambda _: None)
    tars = write_tars(tmp_path / "tars", pairs=4, per_tar=2, image_size=32)
    with pytest.raises(ConfigError, match="tars have no scores"):
        open_sources(DataConfig(source="shards", shards=[ShardSourceConfig(str(tars), min_score=0.5)]), 1, lambda _: None)
