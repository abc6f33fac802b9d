"""Contrastive losses over the global batch (contracts in DESIGN.md, "Losses").

Inputs are this rank's L2-normalised features [b, D]. With W ranks the mean over ranks of the
returned loss equals the single-process loss on the concatenated batch, and each rank's feature
gradient is W x the single-process gradient of its rows (the data-parallel mean divides it back).

False negatives: `keys` ([b, K] int64, e.g. image id and caption hash) mark which samples are
the same pair. Two samples that agree in any key column are not pushed apart: InfoNCE leaves
them out of the softmax denominator, SigLIP counts them as positives, the triplet term never
picks them as negatives. Without keys only a sample matches itself.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from chinese_clip.config import LossConfig
from chinese_clip.distributed import (exchange_with_neighbours, gather_with_grad, gather_without_grad, rank,
                                      world_size)


def sample_keys(batch_size: int, image_ids: torch.Tensor | None = None, caption_ids: torch.Tensor | None = None,
                device: torch.device | None = None) -> torch.Tensor:
    """[b, 2] keys of this rank's samples; a missing id column falls back to the global position."""
    known = image_ids if image_ids is not None else caption_ids
    device = known.device if known is not None else device
    positions = torch.arange(batch_size, device=device) + rank() * batch_size  # unique over the global batch
    columns = [positions if ids is None else ids.to(device=positions.device, dtype=torch.long)
               for ids in (image_ids, caption_ids)]
    return torch.stack(columns, dim=1)


def same_pair(row_keys: torch.Tensor, column_keys: torch.Tensor) -> torch.Tensor:
    """[r, K] x [c, K] keys -> [r, c] bool: the two samples share an image or a caption."""
    return (row_keys[:, None, :] == column_keys[None, :, :]).any(dim=-1)


def _keys_or_positions(keys: torch.Tensor | None, features: torch.Tensor) -> torch.Tensor:
    return keys if keys is not None else sample_keys(features.shape[0], device=features.device)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    local_loss: bool = False,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE: every image against every text of the global batch, and back.

    local_loss=False: every rank computes the whole [B, B] matrix (the same loss on each rank).
    local_loss=True: only this rank's b rows in each direction, [b, B] twice: memory linear in
    B; the mean over ranks is the same loss.
    """
    b = image_features.shape[0]
    all_images = gather_with_grad(image_features)  # [B, D]
    all_texts = gather_with_grad(text_features)  # [B, D]
    all_keys = None if keys is None else gather_without_grad(keys)  # [B, K]
    if local_loss:
        targets = torch.arange(b, device=image_features.device) + rank() * b  # [b]
        logits_per_image = logit_scale * image_features @ all_texts.T  # [b, B]
        logits_per_text = logit_scale * text_features @ all_images.T  # [b, B]
        row_keys = keys
    else:
        targets = torch.arange(all_images.shape[0], device=image_features.device)  # [B]
        logits_per_image = logit_scale * all_images @ all_texts.T  # [B, B]
        logits_per_text = logits_per_image.T
        row_keys = all_keys
    if keys is not None:
        # The relation is symmetric, so one mask serves both directions.
        false_negatives = same_pair(row_keys, all_keys)  # [rows, B]
        false_negatives[torch.arange(len(targets)), targets] = False
        logits_per_image = logits_per_image.masked_fill(false_negatives, float("-inf"))
        logits_per_text = logits_per_text.masked_fill(false_negatives, float("-inf"))
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2


def _sigmoid_pair_sum(images, texts, logit_scale, logit_bias, row_keys, column_keys) -> torch.Tensor:
    labels = 2 * same_pair(row_keys, column_keys).to(images.dtype) - 1  # +1 same pair, -1 otherwise
    return -F.logsigmoid(labels * (logit_scale * images @ texts.T + logit_bias)).sum()


def _sigmoid_block_sum(images, texts, logit_scale, logit_bias, row_keys, column_keys, chunk_size) -> torch.Tensor:
    """Sum of the pairwise sigmoid loss over images x texts, `chunk_size` image rows at a time.

    Each chunk is recomputed in backward instead of stored, so at most one [chunk, c] logit
    block is alive at any moment.
    """
    if chunk_size is None or chunk_size >= images.shape[0]:
        return _sigmoid_pair_sum(images, texts, logit_scale, logit_bias, row_keys, column_keys)
    total = images.new_zeros(())
    for start in range(0, images.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        total = total + checkpoint(_sigmoid_pair_sum, images[rows], texts, logit_scale, logit_bias,
                                   row_keys[rows], column_keys, use_reentrant=False)
    return total


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    exchange: Literal["ring", "gather"] = "ring",
    keys: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The SigLIP pairwise sigmoid loss: summed over this rank's images x all texts, divided by b.

    exchange="ring": text features travel around the ranks (both directions at once), so a rank
    only ever holds b x b logits, and with `chunk_size` only chunk x b of them at a time.
    exchange="gather": one all-gather of the texts, then b x B logits (chunked the same way).
    """
    if exchange not in ("ring", "gather"):
        raise ValueError(f"exchange must be 'ring' or 'gather', got {exchange!r}")
    b = image_features.shape[0]
    keys = _keys_or_positions(keys, image_features)
    all_keys = gather_without_grad(keys)  # [B, K]: ids are tiny next to features, send them all at once

    def block(texts: torch.Tensor, source_rank: int) -> torch.Tensor:
        column_keys = all_keys[source_rank * b:(source_rank + 1) * b]
        return _sigmoid_block_sum(image_features, texts, logit_scale, logit_bias, keys, column_keys, chunk_size)

    if exchange == "gather":
        total = _sigmoid_block_sum(image_features, gather_with_grad(text_features), logit_scale, logit_bias,
                                   keys, all_keys, chunk_size)
        return total / b
    w, r = world_size(), rank()
    total = block(text_features, r)
    from_left = from_right = text_features
    for step in range(1, (w - 1) // 2 + 1):
        from_left, from_right = exchange_with_neighbours(from_left, from_right)
        total = total + block(from_left, (r - step) % w) + block(from_right, (r + step) % w)
    if (w - 1) % 2:  # an even world size leaves the opposite rank: one more one-way step
        (from_left,) = exchange_with_neighbours(from_left)
        total = total + block(from_left, (r - w // 2) % w)
    return total / b


@torch.no_grad()
def _hardest_negatives(anchors, candidates, anchor_keys, candidate_keys, chunk_size):
    """Index of the most similar candidate that is not the anchor's own pair; and whether one exists."""
    indices, found = [], []
    step = chunk_size or anchors.shape[0]
    for start in range(0, anchors.shape[0], step):
        rows = slice(start, start + step)
        similarity = anchors[rows] @ candidates.T  # [chunk, B]
        similarity = similarity.masked_fill(same_pair(anchor_keys[rows], candidate_keys), float("-inf"))
        best, index = similarity.max(dim=1)
        indices.append(index)
        found.append(torch.isfinite(best))
    return torch.cat(indices), torch.cat(found)


def triplet_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    *,
    margin: float,
    keys: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """TripletMarginLoss with the hardest negative of the global batch, image->text and text->image.

    Averaged over this rank's anchors of both directions; an anchor without any negative (every
    sample is its pair) contributes zero rather than being dropped, so per-rank means still add up.
    """
    b = image_features.shape[0]
    keys = _keys_or_positions(keys, image_features)
    all_keys = gather_without_grad(keys)
    all_images = gather_with_grad(image_features)
    all_texts = gather_with_grad(text_features)
    text_index, image_has_negative = _hardest_negatives(image_features, all_texts, keys, all_keys, chunk_size)
    image_index, text_has_negative = _hardest_negatives(text_features, all_images, keys, all_keys, chunk_size)
    image_anchored = F.triplet_margin_loss(image_features, text_features, all_texts[text_index],
                                           margin=margin, reduction="none")
    text_anchored = F.triplet_margin_loss(text_features, image_features, all_images[image_index],
                                          margin=margin, reduction="none")
    return ((image_anchored * image_has_negative).sum() + (text_anchored * text_has_negative).sum()) / (2 * b)


class ContrastiveObjective:
    """The configured loss: InfoNCE or SigLIP, plus alpha x the triplet term; returns every part.

    parts["loss"] is what is optimised; the others are logged (loss/clip, loss/siglip, loss/triplet).
    """

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg

    def __call__(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor, *, image_ids: torch.Tensor | None = None,
                 caption_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        keys = None
        if cfg.mask_false_negatives and (image_ids is not None or caption_ids is not None):
            keys = sample_keys(image_features.shape[0], image_ids, caption_ids)
        if cfg.name == "clip":
            parts = {"clip": clip_loss(image_features, text_features, logit_scale, local_loss=cfg.local_loss,
                                       keys=keys)}
        else:
            parts = {"siglip": siglip_loss(image_features, text_features, logit_scale, logit_bias,
                                           exchange=cfg.exchange, keys=keys, chunk_size=cfg.chunk_size)}
        total = parts[cfg.name]
        if cfg.triplet_alpha > 0:
            parts["triplet"] = triplet_loss(image_features, text_features, margin=cfg.triplet_margin, keys=keys,
                                            chunk_size=cfg.chunk_size)
            total = total + cfg.triplet_alpha * parts["triplet"]
        return {"loss": total, **parts}
