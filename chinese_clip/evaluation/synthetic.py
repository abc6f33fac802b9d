"""Zero-shot evaluation on the embedded synthetic dataset's held-out splits, as any classification set."""
from __future__ import annotations

import torch
from torch import nn

from chinese_clip.config import DataConfig
from chinese_clip.data.collate import ImageTextCollator
from chinese_clip.data.loaders import build_eval_sets
from chinese_clip.data.synthetic import PROMPT_TEMPLATES, class_names
from chinese_clip.evaluation.classification import ClassificationSet, zero_shot_classification

SYNTHETIC_SETS = ("val", "novel")  # the splits of build_eval_sets, as eval.best_metric may name them


def synthetic_sets(cfg: DataConfig, image_size: int) -> dict[str, ClassificationSet]:
    """The held-out splits, drawn once: 24-way classification of the trained colour x shape pairs
    (val) and of the four never-trained ones (novel), by prompt."""
    sets = {}
    for name, dataset in build_eval_sets(cfg, image_size).items():
        samples = [dataset[i] for i in range(len(dataset))]
        sets[name] = ClassificationSet([s["image"] for s in samples], [s["label"] for s in samples], class_names(),
                                       list(PROMPT_TEMPLATES), f"synthetic:{name}",
                                       "chinese_clip.data.synthetic.class_names",
                                       "chinese_clip.data.synthetic.PROMPT_TEMPLATES")
    return sets


def synthetic_evaluator(cfg: DataConfig, image_size: int, collator: ImageTextCollator, device: torch.device,
                        batch_size: int):
    """model -> {"val": result, "novel": result}."""
    sets = synthetic_sets(cfg, image_size)

    def evaluate(model: nn.Module) -> dict[str, dict]:
        return {name: zero_shot_classification(model, data, collator, device, batch_size) for name, data in sets.items()}

    return evaluate
