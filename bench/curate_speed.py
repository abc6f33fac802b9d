"""Curation speed: images/s of curate's scoring (data_tools/curate.py: image and caption encoded, the
cosine kept) against `predict.py index` encoding the same images, in the same run.

    python bench/curate_speed.py [--config recipes/configs/tiny_synthetic.yaml] [--images 1000] [--size 384]
                                 [--workers 2] [--batch 64] [--repeats 3] [--work-dir /tmp/curate_speed] [--out FILE.json]

The images are search_speed.py's noisy synthetic shapes; curate scores them from the shards
build_shards writes of them (built once, not timed), the index encodes the same JPEG bytes as files.
Both decode in --workers DataLoader workers with the same model (the config's architecture, random
weights); each is timed --repeats times, alternating, and the medians are compared.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from search_speed import add_photo_arguments, write_photos  # bench/ is the script's directory

from chinese_clip.checkpoints import model_stamp, save_pretrained
from chinese_clip.config import load_config
from chinese_clip.data.curate import score_shards
from chinese_clip.data.readers import read_pairs
from chinese_clip.data.shards import build_shards
from chinese_clip.inference import load_model
from chinese_clip.model import ChineseCLIP
from chinese_clip.search.index import ImageIndex

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_photo_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/curate_speed"))
    parser.add_argument("--out")
    args = parser.parse_args()

    cfg = load_config(args.config)
    work = args.work_dir
    photos = work / "photos"
    write_photos(photos, args.images, args.size)
    for photo in photos.glob("*.jpg"):  # a caption beside each: the folder layout build_shards reads
        photo.with_suffix(".txt").write_text("一张带噪点的彩色图形照片", encoding="utf-8")
    shards = work / "shards"
    if not (shards / "summary.json").is_file():
        build_shards(read_pairs(photos), shards, rows_per_shard=args.images)
    same = work / "same_images"  # the index encodes the very bytes curate scores (build_shards re-encoded them)
    if not same.is_dir():
        same.mkdir()
        for row in pq.read_table(shards / "shard-00000.parquet", columns=["id", "image"]).to_pylist():
            (same / f"{row['id']}.jpg").write_bytes(row["image"])
    model_dir = work / "model"
    if not model_dir.is_dir():
        save_pretrained(ChineseCLIP(cfg.model).state_dict(), cfg, model_dir)
    predictor = load_model(model_dir, batch_size=args.batch, num_workers=args.workers)

    def index() -> None:
        shutil.rmtree(work / "index", ignore_errors=True)
        ImageIndex(work / "index").build(str(same), predictor, model_dir, say=lambda _: None)

    def score() -> None:
        shutil.rmtree(work / "scores", ignore_errors=True)
        score_shards(shards, work / "scores", predictor, model_stamp(model_dir))

    seconds = {"index": [], "curate score": []}
    for _ in range(args.repeats):
        for name, run in (("index", index), ("curate score", score)):
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    rate = {name: args.images / statistics.median(times) for name, times in seconds.items()}
    result = {"images": args.images, "size": args.size, "workers": args.workers, "batch": args.batch,
              "threads": torch.get_num_threads(), "seconds": seconds,
              "images_per_s": {name: round(r, 1) for name, r in rate.items()},
              "curate_vs_index": round(rate["curate score"] / rate["index"], 3)}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
