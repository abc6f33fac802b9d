"""Evaluation sets as configured (eval.sets, or recipes/evaluate.py's flags): read and checked once at
start-up, run on a model as often as asked, reduced to the scalars that are logged, and tabled beside
published numbers.

The same functions serve `recipes/evaluate.py` and evaluation inside training, so a checkpoint
scores the same in both.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from chinese_clip.config import ConfigError, EvalSetConfig
from chinese_clip.data.collate import ImageTextCollator
from chinese_clip.data.transforms import eval_transform
from chinese_clip.distributed import rank
from chinese_clip.evaluation.classification import (ClassificationSet, read_classification_set,
                                                    zero_shot_classification)
from chinese_clip.evaluation.retrieval import KS, retrieval_metrics, write_cn_clip_features
from chinese_clip.evaluation.retrieval_set import (RetrievalSet, is_shard_path, read_retrieval_set,
                                                   read_shard_retrieval_set, retrieval_features)
from chinese_clip.model import ChineseCLIP

DIRECTIONS = {"t2i": "text_to_image", "i2t": "image_to_text"}
METRICS = {  # task -> the scalar metrics it logs, in table order (%)
    "retrieval": [f"{d}_R@{k}" for d in DIRECTIONS for k in KS] + ["t2i_mean_recall", "i2t_mean_recall",
                                                                    "mean_recall"],
    "classification": ["top1", "top5"],
}


def set_path(entry: EvalSetConfig) -> str:
    """The set's path with environment variables expanded; an unset one is an error, not a literal."""
    path = os.path.expandvars(entry.path)
    if "$" in path:
        raise ConfigError(f"{entry.path}: an environment variable in it is not set (export it, or override the "
                          "set's path)")
    return path


def read_set(entry: EvalSetConfig) -> RetrievalSet:
    path = set_path(entry)
    return read_shard_retrieval_set(path) if is_shard_path(path) else read_retrieval_set(path, entry.split)


@dataclass
class EvalSet:
    """A configured set as read at start-up: every evaluation of the run reuses it."""
    entry: EvalSetConfig
    data: RetrievalSet | ClassificationSet


def read_sets(sets: Sequence[EvalSetConfig], best_metric: str | None = None,
              other_sets: dict[str, str] | None = None) -> list[EvalSet]:
    """Every set, label list and template file, read once, now: a wrong path or a malformed line is a
    ConfigError at start-up and not at the first evaluation hours in. `other_sets` ({name: task}, the
    synthetic held-out splits) are valid targets of `best_metric` too."""
    tasks = dict(other_sets or {})
    read = []
    for i, entry in enumerate(sets):
        if not entry.name or not entry.path:
            raise ConfigError(f"eval.sets[{i}]: give it a name and a path")
        if entry.name in tasks:
            raise ConfigError(f"eval set {entry.name}: the name is used twice; names identify sets in the results")
        if entry.task == "retrieval" and (entry.labels or entry.templates):
            raise ConfigError(f"eval set {entry.name}: labels and templates apply to task: classification")
        try:
            data = (read_set(entry) if entry.task == "retrieval"
                    else read_classification_set(set_path(entry), entry.labels, entry.templates))
        except (FileNotFoundError, ValueError) as e:  # ConfigError included
            raise ConfigError(f"eval set {entry.name}: {e}") from None
        if unknown := sorted(set(entry.reference) - set(METRICS[entry.task])):
            raise ConfigError(f"eval set {entry.name}: reference metric {unknown[0]} is not one of "
                              f"{', '.join(METRICS[entry.task])}")
        tasks[entry.name] = entry.task
        read.append(EvalSet(entry, data))
    if best_metric is not None:
        name, _, metric = best_metric.rpartition("/")
        if name not in tasks or metric not in METRICS[tasks[name]]:
            choices = ", ".join(f"{n}/{m}" for n, task in tasks.items() for m in METRICS[task])
            raise ConfigError(f"eval.best_metric {best_metric!r} is not a metric of an evaluated set; "
                              f"choose one of: {choices or 'none (no sets are evaluated)'}")
    return read


def evaluate_set(model: ChineseCLIP, evaluated: EvalSet, collator: ImageTextCollator, device: torch.device,
                 batch_size: int = 256, features_dir: Path | None = None, num_workers: int = 0) -> dict:
    """One set's full result (as results.json and eval.json hold it), its images decoded in `num_workers`
    DataLoader workers. Every rank calls it together."""
    if isinstance(evaluated.data, ClassificationSet):
        return zero_shot_classification(model, evaluated.data, collator, device, batch_size, num_workers)
    return evaluate_retrieval(model, evaluated, collator, device, batch_size, features_dir, num_workers)


def evaluate_retrieval(model: ChineseCLIP, evaluated: EvalSet, collator: ImageTextCollator,
                       device: torch.device, batch_size: int = 256, features_dir: Path | None = None,
                       num_workers: int = 0) -> dict:
    """Text<->image recall; images get Chinese-CLIP's evaluation transform (square bicubic resize).
    With `features_dir`, rank 0 also writes the features in Chinese-CLIP's jsonl format, for its
    make_topk_predictions*.py and evaluation*.py (see write_cn_clip_features for the ids)."""
    entry, data = evaluated.entry, evaluated.data
    transform = eval_transform(model.cfg.vision.image_size)
    texts, images = retrieval_features(model, data, collator, transform, device, batch_size, num_workers)
    if features_dir is not None and rank() == 0:
        features_dir.mkdir(parents=True, exist_ok=True)
        write_cn_clip_features(features_dir / f"{entry.split}_imgs.img_feat.jsonl", data.image_ids, images, "image")
        write_cn_clip_features(features_dir / f"{entry.split}_texts.txt_feat.jsonl", data.text_ids, texts, "text")
    return {"task": "retrieval", "data": set_path(entry), "split": entry.split, "texts": len(texts),
            "images": len(images), **retrieval_metrics(texts, images, data.text_to_images)}


def sets_evaluator(sets: Sequence[EvalSet], collator: ImageTextCollator, device: torch.device,
                   batch_size: int = 256, num_workers: int = 0) -> Callable[[ChineseCLIP], dict[str, dict]]:
    """model -> {set name: result}, for the Trainer: every evaluation of the run scores the sets as
    read_sets read them at start-up. An image that does not decode (read_sets reads the files, not
    the pixels) stops the run as a ConfigError naming the set and the image."""
    def evaluate(model: ChineseCLIP) -> dict[str, dict]:
        results = {}
        for evaluated in sets:
            try:
                results[evaluated.entry.name] = evaluate_set(model, evaluated, collator, device, batch_size,
                                                             num_workers=num_workers)
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(f"eval set {evaluated.entry.name}: {e}") from None
        return results

    return evaluate


def scalar_metrics(result: dict) -> dict[str, float]:
    """What is logged of a result, the metrics of its task (METRICS): the retrieval recalls flattened
    (t2i_R@1, ..., each direction's mean, mean_recall), or classification's top1 and top5."""
    if result.get("task") == "retrieval":
        flat = {}
        for short, direction in DIRECTIONS.items():
            recalls = {f"{short}_R@{k}": result[direction][f"R@{k}"] for k in KS}
            flat.update(recalls, **{f"{short}_mean_recall": sum(recalls.values()) / len(recalls)})
        return {**flat, "mean_recall": result["mean_recall"]}
    return {metric: result[metric] for metric in METRICS["classification"]}


def markdown_table(results: dict[str, dict], references: dict[str, dict[str, float]] | None = None,
                   reference_name: str = "published") -> str:
    """{set name: result} -> a retrieval table and a classification table (with the hashes of the labels
    and templates used), for the sets there are; a set's `references` (metric -> %) in a row below it."""
    references = references or {}
    tables = []
    for task, headers in (("retrieval", [f"{d} R@{k}" for d in DIRECTIONS for k in KS] + ["t2i MR", "i2t MR", "MR"]),
                          ("classification", ["top-1", "top-5", "images", "classes", "labels sha256",
                                              "templates sha256"])):
        chosen = {name: r for name, r in results.items() if r.get("task") == task}
        if not chosen:
            continue
        lines = ["| set | " + " | ".join(headers) + " |", "|" + "---|" * (len(headers) + 1)]
        for name, result in chosen.items():
            cells = [f"{scalar_metrics(result)[m]:.2f}" for m in METRICS[task]]
            if task == "classification":
                cells += [str(result["images"]), str(result["classes"]), result["labels_sha256"],
                          f"{result['templates_sha256']} ({result['templates']})"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
            if name in references:
                cells = [f"{references[name][m]:.1f}" if m in references[name] else "–" for m in METRICS[task]]
                lines.append(f"| {name}: {reference_name} | " + " | ".join(cells + ["–"] * (len(headers) - len(cells)))
                             + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)
