"""Contrastive losses over the global batch (contracts in DESIGN.md, "Losses").

Inputs are this rank's L2-normalised features [b, D]. With W ranks the mean over ranks of the
returned loss equals the single-process loss on the concatenated batch, and each rank's feature
gradient is W x the single-process gradient of its rows (the data-parallel mean divides it back).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from chinese_clip.distributed import gather_with_grad, rank


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    local_loss: bool = False,
) -> torch.Tensor:
    """Symmetric InfoNCE: every image against every text of the global batch, and back.

    local_loss=False: every rank computes the whole [B, B] matrix (the same loss on each rank).
    local_loss=True: only this rank's b rows in each direction, [b, B] twice: memory linear in
    B; the mean over ranks is the same loss.
    """
    all_images = gather_with_grad(image_features)  # [B, D]
    all_texts = gather_with_grad(text_features)  # [B, D]
    if local_loss:
        b = image_features.shape[0]
        targets = torch.arange(b, device=image_features.device) + rank() * b  # [b]
        logits_per_image = logit_scale * image_features @ all_texts.T  # [b, B]
        logits_per_text = logit_scale * text_features @ all_images.T  # [b, B]
    else:
        targets = torch.arange(all_images.shape[0], device=image_features.device)  # [B]
        logits_per_image = logit_scale * all_images @ all_texts.T  # [B, B]
        logits_per_text = logits_per_image.T
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2
