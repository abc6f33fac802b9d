"""Features of many items (texts, images, class prompts) computed across ranks: every rank encodes
its share in batches and all of them get every feature, in the items' order. Images are decoded in
DataLoader workers; texts go through Chinese-CLIP's text preprocessing first, as its evaluation does."""
from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms.v2.functional import pil_to_tensor
from tqdm import tqdm

from chinese_clip.data.collate import ImageTextCollator
from chinese_clip.data.images import to_rgb
from chinese_clip.data.transforms import UnusableSample, decode
from chinese_clip.distributed import gather_without_grad, rank, world_size
from chinese_clip.model import ChineseCLIP
from chinese_clip.tokenizer import ChineseTokenizer, chinese_clip_text


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Every evaluation runs inside this: eval mode (no dropout, no FLIP masking) without gradients, and
    the model's mode as it was afterwards, so that training continues in train mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@torch.no_grad()
def encode_sharded(items: Sequence, encode_batch: Callable[[Any], torch.Tensor], batch_size: int, desc: str,
                   collate_fn: Callable = list, num_workers: int = 0, pin_memory: bool = False) -> torch.Tensor:
    """[len(items), D]: rank r encodes items r, r + W, ... in batches (`collate_fn` of the items, in
    `num_workers` DataLoader workers); every rank makes the same number of forward calls (a forward
    is collective under ZeRO-3 and FSDP), padding its share with a repeat that is dropped."""
    count = len(items)
    share = list(range(rank(), count, world_size()))
    per_rank = math.ceil(count / world_size())
    padded = share + [share[0] if share else 0] * (per_rank - len(share))
    # Its own generator: starting the loader must not draw from the global RNG, which training continues.
    loader = DataLoader(Subset(items, padded), batch_size=batch_size, collate_fn=collate_fn, num_workers=num_workers,
                        pin_memory=pin_memory, generator=torch.Generator())
    parts = []
    # closed on an error too, so that the error is not printed into the bar's line
    with tqdm(loader, desc=desc, disable=rank() != 0, mininterval=1.0, delay=2.0) as batches:
        for batch in batches:
            parts.append(encode_batch(batch).float())
    local = torch.cat(parts)  # [per_rank, D]
    gathered = gather_without_grad(local)  # rank-major: rank r's rows at [r * per_rank, (r + 1) * per_rank)
    return gathered[[(i % world_size()) * per_rank + i // world_size() for i in range(count)]]


class StoredImages(Dataset):
    """Images as stored (encoded bytes, or files), decoded and transformed where they are loaded: in
    the DataLoader workers. One that does not decode comes back as its error, which the main process
    raises (an exception from a worker would arrive wrapped in the worker's traceback)."""

    def __init__(self, images: Sequence[bytes | Path | Image.Image], names: Sequence[str], transform: Callable):
        self.images, self.names, self.transform = images, names, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, str | None]:
        image = self.images[i]
        try:
            if isinstance(image, Image.Image):  # already decoded (the inference API takes PIL images)
                return self.transform(pil_to_tensor(to_rgb(image))), None
            return self.transform(decode(image.read_bytes() if isinstance(image, Path) else image)), None
        except UnusableSample as e:
            return None, f"{self.names[i]}: {e}"


def _pixels_or_errors(collator: ImageTextCollator, samples: list[tuple]) -> tuple[torch.Tensor | None, list[str]]:
    errors = [error for _, error in samples if error]
    return (None if errors else collator.pixel_batch([pixels for pixels, _ in samples])), errors


def encode_images(model: ChineseCLIP, images: StoredImages, collator: ImageTextCollator, device: torch.device,
                  batch_size: int, num_workers: int) -> torch.Tensor:
    """[len(images), D] on every rank, the images decoded in `num_workers` DataLoader workers."""
    def encode(batch: tuple[torch.Tensor | None, list[str]]) -> torch.Tensor:
        pixels, errors = batch
        if errors:
            raise ValueError(errors[0])
        return model.encode_image(pixels.to(device, non_blocking=True))

    return encode_sharded(images, encode, batch_size, "images", partial(_pixels_or_errors, collator), num_workers,
                          pin_memory=device.type == "cuda")


def encode_texts(model: ChineseCLIP, tokenizer: ChineseTokenizer, texts: Sequence[str],
                 device: torch.device) -> torch.Tensor:
    """[len(texts), D]: one batch of texts, preprocessed as Chinese-CLIP does and tokenized."""
    tokens = {k: v.to(device) for k, v in tokenizer([chinese_clip_text(t) for t in texts]).items()}
    return model.encode_text(tokens["input_ids"], tokens["attention_mask"])
