"""Training input throughput: images/s through decode + transform + collate (tokenization included),
for our parquet shards and webdataset tars against Chinese-CLIP's LMDB dataset class and
webdataset's own pipeline, on the same generated images, from local disk and from an S3 server.

    python bench/data_throughput.py [--images 5000] [--size 224] [--batch 128] [--workers 0 2]
                                    [--work-dir /tmp/data_throughput] [--out FILE.json]

The images are drawn once (the synthetic shapes at --size px, with pixel noise so that they
compress like photographs, ~20-30 KB as JPEG q95) and written in Chinese-CLIP's
`train_imgs.tsv` + `train_texts.jsonl` layout. cn_clip's own build_lmdb_dataset.py turns that into
its LMDB; data_tools' build_shards turns the same files into our shards. Each loader then runs
one timed pass over every image after one warm-up batch, with 0 workers (the main process: the
rate of one worker) and with each --workers count. cn_clip's LMDBDataset is read as its trainer
reads it: random order, one sample per __getitem__, default collate; its transform is the square
bicubic resize, which is ours for fine-tuning (data.transform=resize); ours is also timed with
the random resized crop of pretraining. The same pairs are also written as 16 webdataset tars in
img2dataset's layout: ours trains on them directly (captions normalised and filtered as
build_shards does), and webdataset's own pipeline (WebDataset -> shuffle -> our decode, transform
and collate, so that only the reading differs) reads them too; both with the random resized crop.
The tars and shards are then put on a moto S3 server on 127.0.0.1 and ours reads them from there.
Last, the cost of resuming: the time to the first batch of a loader resumed near the end of the
epoch, less that of a fresh one, over the rows it replays (read, not decoded) to get there.
"""
from __future__ import annotations

import argparse
import base64
import json
import io
import os
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from chinese_clip.config import DataConfig, ShardSourceConfig
from chinese_clip.data.images import encode_jpeg
from chinese_clip.data.loaders import build_collator, build_train_loader
from chinese_clip.data.readers import read_pairs
from chinese_clip.data.shards import build_shards
from chinese_clip.data.stream import open_sources, stream_layout
from chinese_clip.data.synthetic import SyntheticShapes
from chinese_clip.data.transforms import build_transform, decode
from chinese_clip.tokenizer import load_tokenizer
from PIL import Image


def write_cn_clip_layout(root: Path, count: int, size: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    dataset = SyntheticShapes("train", count, size)
    rng = np.random.default_rng(0)
    with open(root / "train_imgs.tsv", "w") as images, open(root / "train_texts.jsonl", "w", encoding="utf-8") as texts:
        for i in range(count):
            sample = dataset[i]
            noisy = np.asarray(sample["image"], dtype=np.int16) + rng.integers(-12, 13, (size, size, 3))
            jpeg = encode_jpeg(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))
            images.write(f"{i}\t{base64.urlsafe_b64encode(jpeg).decode()}\n")
            texts.write(json.dumps({"text_id": i, "text": sample["text"], "image_ids": [i]}, ensure_ascii=False) + "\n")


def write_tars(raw: Path, tars: Path, count: int) -> None:
    """The same pairs as 16 tars in img2dataset's layout (key.jpg + key.txt)."""
    tars.mkdir(parents=True, exist_ok=True)
    per_tar = -(-count // 16)
    for index, pair in enumerate(read_pairs(raw, "train")):
        with tarfile.open(tars / f"{index // per_tar:05d}.tar", "a") as tar:
            for name, data in ((f"{index:09d}.jpg", pair.image), (f"{index:09d}.txt", pair.caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def prepare(work: Path, count: int, size: int) -> tuple[Path, Path, Path]:
    raw, lmdb_dir, shards, tars = work / "raw", work / "lmdb", work / "shards", work / "tars"
    if not (raw / "train_texts.jsonl").is_file():
        write_cn_clip_layout(raw, count, size)
    if not (lmdb_dir / "train").is_dir():
        subprocess.run([sys.executable, "-m", "cn_clip.preprocess.build_lmdb_dataset", "--data_dir", str(raw),
                        "--splits", "train", "--lmdb_dir", str(lmdb_dir)], check=True, capture_output=True)
    if not (shards / "summary.json").is_file():
        build_shards(read_pairs(raw, "train"), shards, rows_per_shard=max(1, count // 16), workers=2)
    if not (tars / "00015.tar").is_file():
        write_tars(raw, tars, count)
    return lmdb_dir / "train", shards, tars


def images_per_s(batches, batch_size: int, count: int) -> float:
    next(batches)  # warm-up: worker start-up, first reads
    steps = count // batch_size
    tic = time.perf_counter()
    for batch in islice(batches, steps):
        assert batch[0].shape[0] == batch_size if isinstance(batch, (list, tuple)) else True
    return steps * batch_size / (time.perf_counter() - tic)


def ours(path: str, size: int, batch: int, workers: int, transform: str, count: int) -> float:
    cfg = DataConfig(source="shards", shards=[ShardSourceConfig(str(path))], batch_size=batch,
                     num_workers=workers, transform=transform, context_length=52)
    sources = open_sources(cfg, 1, say=lambda _: None)
    loader = build_train_loader(cfg, load_tokenizer(None, 52), size, rank=0, world_size=1, seed=0, sources=sources)
    return images_per_s(loader, batch, count)


def first_batch_s(cfg: DataConfig, sources, position: dict | None) -> float:
    tic = time.perf_counter()
    next(build_train_loader(cfg, load_tokenizer(None, 52), 224, rank=0, world_size=1, seed=0, sources=sources,
                            position=position))
    return time.perf_counter() - tic


def replay_rows_per_s(shards: Path, count: int) -> float:
    cfg = DataConfig(source="shards", shards=[ShardSourceConfig(str(shards))], batch_size=128, num_workers=0,
                     context_length=52)
    sources = open_sources(cfg, 1, say=lambda _: None)
    rows = count - cfg.batch_size
    rng = np.random.default_rng([0, 0, 0]).bit_generator.state
    position = {"layout": stream_layout(sources, cfg, 1, 0), "next_worker": 0,
                "workers": {"0": {"sources": [[0, rows]], "read": rows, "skipped": 0, "rng": rng}}}
    fresh = min(first_batch_s(cfg, sources, None) for _ in range(3))
    resumed = min(first_batch_s(cfg, sources, position) for _ in range(3))
    return rows / (resumed - fresh)


def webdataset_pipeline(tars: Path, size: int, batch: int, workers: int, count: int) -> float:
    """webdataset's reader and shuffle, with our decode, random resized crop and collate."""
    import webdataset as wds

    transform = build_transform(DataConfig(), size)
    collate = build_collator(DataConfig(context_length=52), load_tokenizer(None, 52))
    urls = [str(p) for p in sorted(tars.glob("*.tar"))]
    dataset = (wds.WebDataset(urls, shardshuffle=len(urls), repeat=True, seed=0)
               .shuffle(2000).to_tuple("jpg", "txt")
               .map(lambda s: {"image": transform(decode(s[0])), "text": s[1].decode(), "image_id": 0})
               .batched(batch, collation_fn=collate, partial=False))
    return images_per_s(iter(wds.WebLoader(dataset, batch_size=None, num_workers=workers)), batch, count)


def s3_server(shards: Path, tars: Path) -> subprocess.Popen:
    """moto's S3 server on 127.0.0.1 holding the shards and tars; AWS clients pointed at it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    for _ in range(100):
        try:
            urllib.request.urlopen(os.environ["AWS_ENDPOINT_URL"], timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("bench")
    fs.put(str(shards), "bench/shards", recursive=True)
    fs.put(str(tars), "bench/tars", recursive=True)
    return server


def cn_clip(lmdb: Path, size: int, batch: int, workers: int, count: int) -> float:
    from cn_clip.training.data import LMDBDataset

    dataset = LMDBDataset(str(lmdb), split="train", max_txt_length=52, resolution=size)
    sampler = RandomSampler(dataset, replacement=True, num_samples=10 * count)  # endless enough for warm-up + pass
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True)
    return images_per_s(iter(loader), batch, count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--work-dir", default="/tmp/data_throughput")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core per loader process, as in training, where the GPU feeds on the rest
    lmdb, shards, tars = prepare(Path(args.work_dir), args.images, args.size)
    server = s3_server(shards, tars)
    crop = "random_resized_crop"
    rows = []
    try:
        for workers in args.workers:
            row = {"workers": workers,
                   "cn_clip LMDB, square resize": cn_clip(lmdb, args.size, args.batch, workers, args.images),
                   "ours, square resize": ours(shards, args.size, args.batch, workers, "resize", args.images),
                   "ours, random resized crop": ours(shards, args.size, args.batch, workers, crop, args.images),
                   "ours on tars, random resized crop": ours(tars, args.size, args.batch, workers, crop, args.images),
                   "webdataset's pipeline on tars, random resized crop": webdataset_pipeline(
                       tars, args.size, args.batch, workers, args.images),
                   "ours, shards on S3": ours("s3://bench/shards", args.size, args.batch, workers, crop, args.images),
                   "ours, tars on S3": ours("s3://bench/tars/{00000..00015}.tar", args.size, args.batch, workers, crop,
                                            args.images)}
            rows.append(row)
            print(json.dumps(row))
    finally:
        server.terminate()
    columns = list(rows[0])[1:]
    print(f"\n| workers | {' | '.join(columns)} |\n|---|{'---|' * len(columns)}")
    for row in rows:
        print(f"| {row['workers']} | " + " | ".join(f"{row[c]:,.0f}" for c in columns) + " |")
    replay = replay_rows_per_s(shards, args.images)
    print(f"\nresume: {replay:,.0f} rows/s replayed without decoding")
    if args.out:
        Path(args.out).write_text(json.dumps({"images_per_s": rows, "replay_rows_per_s": replay}, indent=2))


if __name__ == "__main__":
    main()
