"""Batching: images to one normalised float tensor, captions through the tokenizer."""
from __future__ import annotations

import hashlib

import torch
from torchvision.transforms.v2 import functional as TF

from chinese_clip.tokenizer import ChineseTokenizer


def caption_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """[N, L] token ids -> [N] int64: equal exactly when the model sees the same caption.

    Hashing the tokens rather than the string also catches captions that differ only past the
    context length, which the model cannot tell apart either.
    """
    digests = [hashlib.blake2b(row.numpy().tobytes(), digest_size=8).digest() for row in input_ids]
    return torch.tensor([int.from_bytes(d, "little", signed=True) for d in digests], dtype=torch.long)


class ImageTextCollator:
    """Samples {"image": PIL or uint8 [3, H, W], "text": str, "label"?: int, "image_id"?: int} -> a model-ready batch.

    Images arrive as uint8 (decoding and resizing stay in 8 bits) and become floats only here.
    "caption_id" and "image_id" let the loss recognise false negatives (see losses.py).
    """

    def __init__(self, tokenizer: ChineseTokenizer, mean: tuple[float, ...], std: tuple[float, ...]):
        self.tokenizer = tokenizer
        # (x / 255 - mean) / std as (x - 255 mean) x 1 / (255 std): two in-place passes per image
        self.shift = (255 * torch.tensor(mean)).view(3, 1, 1)
        self.scale = (1 / (255 * torch.tensor(std))).view(3, 1, 1)

    def pixel_batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        """uint8 [3, H, W] images -> the normalised float batch [b, 3, H, W]. Converted image by image
        into the batch, while each is still in cache: 2.5x faster than stacking, converting and
        normalising the whole batch (bench/data_throughput.py)."""
        pixels = torch.empty((len(images), *images[0].shape), dtype=torch.float32)
        for out, image in zip(pixels, images):
            out.copy_(image).sub_(self.shift).mul_(self.scale)
        return pixels

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        images = [s["image"] if torch.is_tensor(s["image"]) else TF.pil_to_tensor(s["image"]) for s in samples]
        batch = {"pixel_values": self.pixel_batch(images), **self.tokenizer([s["text"] for s in samples])}
        batch["caption_id"] = caption_ids(batch["input_ids"])
        for key in ("label", "image_id"):
            if key in samples[0]:
                batch[key] = torch.tensor([s[key] for s in samples])
        return batch
