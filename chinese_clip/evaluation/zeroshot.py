"""Zero-shot classification: class prompts through the text tower, images through the vision tower.

Runs on every rank together, each on its own shard of the images. Under ZeRO-3 a forward is a
collective (parameters are gathered per layer), so every rank makes the same number of calls:
shards are padded to equal length and the padding is dropped before counting.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from chinese_clip.distributed import rank, sum_across_ranks, world_size
from chinese_clip.evaluation.features import encode_sharded, encode_texts
from chinese_clip.model import ChineseCLIP
from chinese_clip.tokenizer import ChineseTokenizer


@torch.no_grad()
def class_embeddings(model: ChineseCLIP, tokenizer: ChineseTokenizer, class_names: Sequence[str],
                     templates: Sequence[str], device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """[C, D]: each class's prompt embeddings (unit length) averaged over the templates and
    re-normalised, as Chinese-CLIP's zero-shot classifier. The prompts (1,000 ImageNet classes x 183
    templates) are encoded in batches, shared across ranks."""
    prompts = [t.replace("{}", name) for name in class_names for t in templates]

    features = encode_sharded(prompts, lambda texts: encode_texts(model, tokenizer, texts, device), batch_size,
                              "class prompts").to(device)  # [C*T, D]
    mean = features.view(len(class_names), len(templates), -1).mean(dim=1)  # [C, D]
    return torch.nn.functional.normalize(mean, dim=-1)


@torch.no_grad()
def zero_shot_classification(model: ChineseCLIP, tokenizer: ChineseTokenizer, dataset: Dataset,
                             collate_fn: Callable, class_names: Sequence[str], templates: Sequence[str],
                             device: torch.device, batch_size: int = 256) -> dict:
    """Top-1 / top-5 accuracy (%) of `dataset` (samples carry "label") against all `class_names`."""
    if len(dataset) == 0:
        raise ValueError("zero-shot classification needs at least one image")
    was_training = model.training
    model.eval()
    classifier = class_embeddings(model, tokenizer, class_names, templates, device, batch_size)  # [C, D]
    shard = list(range(rank(), len(dataset), world_size()))
    per_rank = math.ceil(len(dataset) / world_size())
    padded = shard + [shard[0] if shard else 0] * (per_rank - len(shard))
    loader = DataLoader(Subset(dataset, padded), batch_size=batch_size, collate_fn=collate_fn)
    k = min(5, len(class_names))
    top1 = topk = 0
    seen = 0
    for batch in loader:
        logits = model.encode_image(batch["pixel_values"].to(device)).float() @ classifier.T  # [b, C]
        labels = batch["label"].to(device)  # [b]
        valid = max(0, min(len(labels), len(shard) - seen))  # rows past the real shard are padding
        seen += len(labels)
        ranked = logits[:valid].topk(k, dim=-1).indices  # [valid, k]
        top1 += (ranked[:, 0] == labels[:valid]).sum().item()
        topk += (ranked == labels[:valid, None]).any(dim=-1).sum().item()
    counts = sum_across_ranks(torch.tensor([top1, topk, len(shard)], dtype=torch.float64, device=device))
    model.train(was_training)
    n = int(counts[2].item())
    return {  # in %, as every other evaluation reports
        "top1": 100.0 * counts[0].item() / n,
        f"top{k}": 100.0 * counts[1].item() / n,
        "num_images": n,
        "num_classes": len(class_names),
        "chance_top1": 100.0 / len(class_names),
    }
