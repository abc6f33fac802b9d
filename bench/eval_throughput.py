"""Evaluation throughput: images/s of retrieval image-feature extraction, ours against Chinese-CLIP's
`extract_features.py` path, on the same images, in one run.

    python bench/eval_throughput.py [--images 2000] [--size 384] [--batch 128] [--workers 0 1 2 4]
                                    [--work-dir /tmp/eval_throughput] [--out FILE.json]

The images (the synthetic shapes at --size px with pixel noise, JPEG, as bench/data_throughput.py
draws them) are written in Chinese-CLIP's layout and turned into its LMDB by its own
build_lmdb_dataset.py. Both sides run the tiny preset's architecture at 224 px (ours: ChineseCLIP;
Chinese-CLIP: its `CLIP` class at the same shape), so that the figure is dominated by what differs:
reading, decoding and the transform.

- Chinese-CLIP: `cn_clip.eval.data.get_eval_img_dataset` (its EvalImgDataset over the LMDB, its
  transform, its DataLoader: 0 workers, as its cursor-based dataset requires), then for every batch
  what extract_features.py does: `model(images, None)`, the L2 normalisation and `.tolist()` of the
  features (`.cuda()` is a no-op on this CPU).
- Ours: the retrieval set read by `read_retrieval_set`, its images decoded and transformed in
  DataLoader workers (`encode_images`, what recipes/evaluate.py and evaluation in training run),
  with each --workers count (eval.num_workers; 0 is the main process alone).

Each path makes one untimed batch first (model warm-up), then one timed pass over every image.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from data_throughput import write_cn_clip_layout
from peers import cn_clip_kwargs

from chinese_clip.config import DataConfig, load_config
from chinese_clip.data.loaders import build_collator
from chinese_clip.data.transforms import eval_transform
from chinese_clip.evaluation.features import StoredImages, encode_images
from chinese_clip.evaluation.retrieval_set import read_retrieval_set
from chinese_clip.model import ChineseCLIP
from chinese_clip.tokenizer import load_tokenizer

IMAGE_SIZE = 224


def prepare(work: Path, count: int, size: int) -> tuple[Path, Path]:
    raw, lmdb_dir = work / "raw", work / "lmdb"
    if not (raw / "train_texts.jsonl").is_file():
        write_cn_clip_layout(raw, count, size)
    if not (lmdb_dir / "train").is_dir():
        subprocess.run([sys.executable, "-m", "cn_clip.preprocess.build_lmdb_dataset", "--data_dir", str(raw),
                        "--splits", "train", "--lmdb_dir", str(lmdb_dir)], check=True, capture_output=True)
    return raw, lmdb_dir / "train" / "imgs"


def models():
    """Ours and Chinese-CLIP's CLIP at the tiny preset's shape, 224 px."""
    from cn_clip.clip.model import CLIP

    cfg = load_config(Path(__file__).parents[1] / "recipes" / "configs" / "tiny_synthetic.yaml",
                      [f"model.vision.image_size={IMAGE_SIZE}"]).model
    return ChineseCLIP(cfg).eval(), CLIP(**cn_clip_kwargs(cfg)).float().eval()


@torch.no_grad()
def cn_clip_extract(model, lmdb_imgs: Path, batch: int, count: int) -> float:
    from cn_clip.eval.data import get_eval_img_dataset

    def one_pass() -> int:
        data = get_eval_img_dataset(SimpleNamespace(image_data=str(lmdb_imgs), vision_model="ViT-B-16",
                                                    img_batch_size=batch))
        done = 0
        for image_ids, images in data.dataloader:
            features = model(images, None)  # images.cuda() in extract_features.py: a no-op here
            features /= features.norm(dim=-1, keepdim=True)
            done += len(list(zip(image_ids.tolist(), features.tolist())))
        return done

    with torch.no_grad():
        model(torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE), None)  # warm-up
    tic = time.perf_counter()
    done = one_pass()
    assert done == count, done
    return done / (time.perf_counter() - tic)


def ours_extract(model: ChineseCLIP, raw: Path, batch: int, workers: int, count: int) -> float:
    data = read_retrieval_set(raw, "train")
    transform = eval_transform(IMAGE_SIZE)
    collator = build_collator(DataConfig(), load_tokenizer(None, 52))
    images = StoredImages(data.images, data.image_ids, transform)
    with torch.no_grad():
        model.encode_image(torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE))  # warm-up
    tic = time.perf_counter()
    features = encode_images(model, images, collator, torch.device("cpu"), batch, workers)
    assert len(features) == count, len(features)
    return count / (time.perf_counter() - tic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=384, help="stored image side, px")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--work-dir", default="/tmp/eval_throughput")
    parser.add_argument("--out")
    args = parser.parse_args()
    raw, lmdb_imgs = prepare(Path(args.work_dir), args.images, args.size)
    ours, theirs = models()
    result = {"threads": torch.get_num_threads(), "images": args.images, "stored_px": args.size,
              "cn_clip extract_features path": cn_clip_extract(theirs, lmdb_imgs, args.batch, args.images)}
    for workers in args.workers:
        result[f"ours, {workers} workers"] = ours_extract(ours, raw, args.batch, workers, args.images)
    print(json.dumps(result, indent=2))
    baseline = result["cn_clip extract_features path"]
    print(f"\n| path | images/s | vs Chinese-CLIP |\n|---|---|---|\n| Chinese-CLIP extract_features.py | {baseline:,.0f} | 1.00x |")
    for workers in args.workers:
        value = result[f"ours, {workers} workers"]
        print(f"| ours, eval.num_workers={workers} | {value:,.0f} | {value / baseline:.2f}x |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
