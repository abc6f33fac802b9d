"""Text-image retrieval metrics: R@1/5/10 in both directions and their mean, as Chinese-CLIP reports
them (percentages), correct when a text has several matching images and an image several texts.

A query scores a hit at K when one of its relevant candidates is among the K best. A candidate
tied with the best relevant one counts as ranked above it, so ties never flatter a model (exact
ties only happen with degenerate features). Scores are computed a block of queries at a time, so
MUGE's 5k x 30k (and larger sets) fit in memory.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import torch

KS = (1, 5, 10)
QUERY_BLOCK = 1024


def recall_at_k(queries: torch.Tensor, candidates: torch.Tensor, relevant: Sequence[Sequence[int]],
                ks: Sequence[int] = KS) -> dict[str, float]:
    """{"R@k": % of queries with a relevant candidate in their top k}. `queries` [Q, D] and
    `candidates` [C, D] are L2-normalised features; `relevant[q]` the candidate indices that match query q."""
    if len(relevant) != len(queries):
        raise ValueError(f"{len(queries)} queries but relevance lists for {len(relevant)}")
    if empty := [q for q, r in enumerate(relevant) if len(r) == 0]:
        raise ValueError(f"{len(empty)} queries have no relevant candidate (the first: query {empty[0]}); "
                         "recall is undefined for them")
    hits = torch.zeros(len(ks), dtype=torch.long)
    limit = torch.tensor(list(ks))
    for start in range(0, len(queries), QUERY_BLOCK):
        scores = queries[start:start + QUERY_BLOCK].float() @ candidates.float().T  # [q, C]
        mask = torch.zeros_like(scores, dtype=torch.bool)
        for row, indices in enumerate(relevant[start:start + QUERY_BLOCK]):
            mask[row, list(indices)] = True
        best = scores.masked_fill(~mask, float("-inf")).max(dim=1, keepdim=True).values  # [q, 1]
        above = (scores > best).sum(1) + ((scores == best) & ~mask).sum(1)  # candidates ranked before it
        hits += (above[:, None] < limit[None, :]).sum(0)
    return {f"R@{k}": 100.0 * h.item() / len(queries) for k, h in zip(ks, hits)}


def retrieval_metrics(text_features: torch.Tensor, image_features: torch.Tensor,
                      text_to_images: Sequence[Sequence[int]]) -> dict:
    """Both directions and the mean of the six recalls (Chinese-CLIP's "MR"). Every image is a
    candidate for every text; images that no text matches (distractors) are not image-to-text
    queries, as in Chinese-CLIP's evaluation; the counts of queries say so."""
    image_to_texts: list[list[int]] = [[] for _ in range(len(image_features))]
    for text, images in enumerate(text_to_images):
        for image in images:
            image_to_texts[image].append(text)
    matched = [i for i, texts in enumerate(image_to_texts) if texts]
    t2i = recall_at_k(text_features, image_features, text_to_images)
    i2t = recall_at_k(image_features[matched], text_features, [image_to_texts[i] for i in matched])
    return {"text_to_image": t2i, "image_to_text": i2t,
            "mean_recall": (sum(t2i.values()) + sum(i2t.values())) / (len(t2i) + len(i2t)),
            "queries": {"text_to_image": len(text_features), "image_to_text": len(matched)}}


def cn_clip_id(identifier: int | str) -> int | str:
    """An id as Chinese-CLIP's feature files carry it: an integer when it is all digits (its tsv and
    jsonl ids are), the string otherwise."""
    return int(identifier) if re.fullmatch(r"[0-9]+", str(identifier)) else identifier


def write_cn_clip_features(path: str | Path, ids: Sequence[int | str], features: torch.Tensor, kind: str) -> None:
    """Chinese-CLIP's feature jsonl ({"image_id"|"text_id": id, "feature": [...]} per line), which its
    make_topk_predictions*.py read. Ids are written as cn_clip_id makes them: JSON integers for a set in
    Chinese-CLIP's layout, which is what its evaluation*.py require; ids that are not all digits (our
    shards' row ids) stay strings, and its scripts refuse those."""
    if kind not in ("image", "text"):
        raise ValueError(f"kind must be image or text, got {kind!r}")
    with open(path, "w", encoding="utf-8") as f:
        for identifier, feature in zip(ids, features.float().tolist()):
            f.write(json.dumps({f"{kind}_id": cn_clip_id(identifier), "feature": feature}) + "\n")
