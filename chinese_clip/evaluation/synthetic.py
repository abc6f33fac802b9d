"""Zero-shot evaluation on the embedded synthetic dataset's held-out splits."""
from __future__ import annotations

import torch
from torch import nn

from chinese_clip.config import DataConfig
from chinese_clip.data.loaders import build_collator, build_eval_sets
from chinese_clip.data.synthetic import PROMPT_TEMPLATES, class_names
from chinese_clip.evaluation.zeroshot import zero_shot_classification
from chinese_clip.tokenizer import ChineseTokenizer

SYNTHETIC_SETS = ("val", "novel")  # the splits of build_eval_sets, as eval.best_metric may name them


def synthetic_evaluator(cfg: DataConfig, image_size: int, tokenizer: ChineseTokenizer,
                        device: torch.device, batch_size: int):
    """model -> {"val": metrics, "novel": metrics}: 24-way zero-shot classification by prompt."""
    sets = build_eval_sets(cfg, image_size)
    collate = build_collator(cfg, tokenizer)

    def evaluate(model: nn.Module) -> dict[str, dict]:
        return {name: zero_shot_classification(model, tokenizer, dataset, collate, class_names(),
                                               PROMPT_TEMPLATES, device, batch_size)
                for name, dataset in sets.items()}

    return evaluate
