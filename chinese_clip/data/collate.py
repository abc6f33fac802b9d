"""Batching: images to one normalised float tensor, captions through the tokenizer."""
from __future__ import annotations

import torch
from torchvision.transforms.v2 import functional as TF

from chinese_clip.tokenizer import ChineseTokenizer


class ImageTextCollator:
    """Samples {"image": PIL, "text": str, "label"?: int, "image_id"?: int} -> a model-ready batch.

    Normalising the whole uint8 batch at once is cheaper than per image in the workers.
    """

    def __init__(self, tokenizer: ChineseTokenizer, mean: tuple[float, ...], std: tuple[float, ...]):
        self.tokenizer = tokenizer
        self.mean, self.std = list(mean), list(std)

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        images = torch.stack([TF.pil_to_tensor(s["image"]) for s in samples])  # [b, 3, H, W] uint8
        pixels = TF.normalize(TF.to_dtype(images, torch.float32, scale=True), self.mean, self.std)
        batch = {"pixel_values": pixels, **self.tokenizer([s["text"] for s in samples])}
        for key in ("label", "image_id"):
            if key in samples[0]:
                batch[key] = torch.tensor([s[key] for s in samples])
        return batch
