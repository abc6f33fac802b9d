"""Search speed: how fast `recipes/predict.py index` encodes a folder of photos, how long an update
that finds nothing new takes, and how long one Chinese text query takes against indexes of growing size.

    python bench/search_speed.py [--config recipes/configs/tiny_synthetic.yaml] [--images 1000] [--size 384]
                                 [--index-sizes 10000 100000 1000000] [--work-dir /tmp/search_speed] [--out FILE.json]

The photos are the synthetic shapes at --size px with pixel noise, as JPEG files in one folder. The
model is the config's architecture with random weights (speed does not depend on what it learnt),
saved as a run's model directory. "build" is what `predict.py index` runs (load_model +
ImageIndex.build, --workers DataLoader workers) on an empty index; "update" the same again with
nothing changed. A query is the text encoded plus the top 10 of N unit features held as the index
holds them (fp32 in memory); the median of 20 queries.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from chinese_clip.checkpoints import save_pretrained
from chinese_clip.config import load_config
from chinese_clip.data.synthetic import SyntheticShapes
from chinese_clip.inference import load_model
from chinese_clip.model import ChineseCLIP
from chinese_clip.search.index import ImageIndex

ROOT = Path(__file__).resolve().parents[1]


def write_photos(folder: Path, count: int, size: int) -> None:
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == count:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shapes, rng = SyntheticShapes("train", count, size), np.random.default_rng(0)
    for i in range(count):
        noisy = np.asarray(shapes[i]["image"], dtype=np.int16) + rng.integers(-12, 13, (size, size, 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)


def add_photo_arguments(parser: argparse.ArgumentParser) -> None:
    """What the benches that encode photos share: the model's config, the photos, the loader."""
    parser.add_argument("--config", default=str(ROOT / "recipes" / "configs" / "tiny_synthetic.yaml"))
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_photo_arguments(parser)
    parser.add_argument("--index-sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/search_speed"))
    parser.add_argument("--out")
    args = parser.parse_args()

    cfg = load_config(args.config)
    photos, model_dir, index_dir = (args.work_dir / name for name in ("photos", "model", "index"))
    write_photos(photos, args.images, args.size)
    torch.manual_seed(0)
    save_pretrained(ChineseCLIP(cfg.model).state_dict(), cfg, model_dir)
    shutil.rmtree(index_dir, ignore_errors=True)

    start = time.perf_counter()
    predictor = load_model(model_dir, batch_size=args.batch, num_workers=args.workers)
    loaded = time.perf_counter() - start
    ImageIndex(index_dir).build(str(photos), predictor, model_dir, say=lambda line: None)
    build = time.perf_counter() - start
    start = time.perf_counter()
    ImageIndex(index_dir).build(str(photos), predictor, model_dir, say=lambda line: None)
    update = time.perf_counter() - start

    queries = ["海边的日落", "一只在草地上奔跑的狗", "红色的汽车", "夜晚的城市街道"] * 5
    predictor.encode_texts(queries[0])  # warm-up
    latency = {}
    for size in args.index_sizes:
        index = ImageIndex(index_dir)
        index.items = [{"key": str(i), "image": ""} for i in range(size)]
        index.features = torch.nn.functional.normalize(torch.randn(size, predictor.dim), dim=1)
        times = []
        for query in queries:
            start = time.perf_counter()
            index.search(predictor.encode_texts(query)[0], k=10)
            times.append(time.perf_counter() - start)
        latency[size] = statistics.median(times) * 1000

    result = {"config": args.config, "images": args.images, "size": args.size, "workers": args.workers,
              "threads": torch.get_num_threads(), "model_load_s": round(loaded, 2), "build_s": round(build, 2),
              "build_images_per_s": round(args.images / build, 1), "update_unchanged_s": round(update, 2),
              "query_ms": {str(size): round(ms, 1) for size, ms in latency.items()}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
