"""Evaluation tasks as `recipes/evaluate.py` runs them: a model and a dataset in, scores out."""
from __future__ import annotations

from pathlib import Path

import torch

from chinese_clip.config import DataConfig
from chinese_clip.data.collate import ImageTextCollator
from chinese_clip.data.transforms import build_transform
from chinese_clip.distributed import rank
from chinese_clip.evaluation.retrieval import KS, retrieval_metrics, write_cn_clip_features
from chinese_clip.evaluation.retrieval_set import read_retrieval_set, retrieval_features
from chinese_clip.model import ChineseCLIP


def evaluate_retrieval(model: ChineseCLIP, data_dir: str | Path, split: str, collator: ImageTextCollator,
                       device: torch.device, batch_size: int = 256, features_dir: Path | None = None) -> dict:
    """Text<->image recall on a set in Chinese-CLIP's layout; images get Chinese-CLIP's evaluation
    transform (square bicubic resize). With `features_dir`, rank 0 also writes the features in
    Chinese-CLIP's jsonl format, for its make_topk_predictions*.py and evaluation*.py."""
    data = read_retrieval_set(data_dir, split)
    transform = build_transform(DataConfig(transform="resize"), model.cfg.vision.image_size)
    texts, images = retrieval_features(model, data, collator, transform, device, batch_size)
    if features_dir is not None and rank() == 0:
        features_dir.mkdir(parents=True, exist_ok=True)
        write_cn_clip_features(features_dir / f"{split}_imgs.img_feat.jsonl", data.image_ids, images, "image")
        write_cn_clip_features(features_dir / f"{split}_texts.txt_feat.jsonl", data.text_ids, texts, "text")
    return {"task": "retrieval", "data": str(data_dir), "split": split, "texts": len(texts), "images": len(images),
            **retrieval_metrics(texts, images, data.text_to_images)}


def markdown_table(results: dict[str, dict]) -> str:
    """{set name: result} -> a retrieval table (R@1/5/10 both ways, mean recall) and a classification
    table (top-1, top-5, and the hashes of the labels and templates used), for the sets there are."""
    tables = []
    retrieval = {name: r for name, r in results.items() if r["task"] == "retrieval"}
    if retrieval:
        header = ["set"] + [f"t2i R@{k}" for k in KS] + [f"i2t R@{k}" for k in KS] + ["MR"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name, r in retrieval.items():
            cells = [r["text_to_image"][f"R@{k}"] for k in KS] + [r["image_to_text"][f"R@{k}"] for k in KS]
            lines.append(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells + [r["mean_recall"]]) + " |")
        tables.append("\n".join(lines))
    classification = {name: r for name, r in results.items() if r["task"] == "classification"}
    if classification:
        lines = ["| set | top-1 | top-5 | images | classes | labels sha256 | templates sha256 |", "|" + "---|" * 7]
        for name, r in classification.items():
            lines.append(f"| {name} | {r['top1']:.2f} | {r['top5']:.2f} | {r['images']} | {r['classes']} | "
                         f"{r['labels_sha256']} | {r['templates_sha256']} ({r['templates']}) |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)
