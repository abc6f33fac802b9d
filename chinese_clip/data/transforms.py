"""Encoded image bytes -> a uint8 [3, S, S] tensor of the training resolution.

Decoding (libjpeg-turbo through torchvision.io) and resizing both stay in uint8: the float
conversion and normalisation happen once per batch in the collator. Crops are drawn from a seed
per sample, so a resumed run crops each sample exactly as the uninterrupted run did.
"""
from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

from chinese_clip.config import DataConfig
from chinese_clip.data.images import BadImage, open_image, to_rgb


class UnusableSample(ValueError):
    """A training sample to skip; str() is the reason, for skip counters and logs."""


def decode(data: bytes) -> torch.Tensor:
    """[3, H, W] uint8 RGB (an animation's first frame), or UnusableSample. The header is checked first
    (PIL reads it without decoding), so a decompression bomb is refused before its pixels are allocated."""
    try:
        image = open_image(data)
        if image.format == "GIF" or getattr(image, "is_animated", False):
            # torchvision decodes every frame of a GIF (a thousand small frames are gigabytes) and refuses
            # animated WebP; PIL decodes only the first frame
            return pil_to_tensor(to_rgb(image))
    except BadImage as e:
        raise UnusableSample(str(e)) from None
    except OSError as e:
        raise UnusableSample(f"truncated or corrupt: {e}") from None
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as e:
        # "decode_jpeg, <source file>:171, Image is incomplete or truncated": keep the reason's first sentence.
        reason = re.sub(r"^\w+, \S+:\d+, ", "", str(e).strip()).split(". ")[0]
        raise UnusableSample(f"does not decode: {reason}") from None


def build_transform(cfg: DataConfig, image_size: int):
    """Chinese-CLIP's square resize, or a random resized crop; bicubic with antialiasing either way."""
    bicubic = v2.InterpolationMode.BICUBIC
    if cfg.transform == "resize":
        return v2.Resize((image_size, image_size), interpolation=bicubic, antialias=True)
    return v2.RandomResizedCrop(image_size, scale=tuple(cfg.crop_scale), interpolation=bicubic, antialias=True)


def eval_transform(image_size: int):
    """What every evaluation and prediction does to an image: Chinese-CLIP's square bicubic resize of
    the whole image (no crop)."""
    return build_transform(DataConfig(transform="resize"), image_size)


_seeder = torch.Generator()


@contextmanager
def seeded(seed: int):
    """torchvision's random transforms draw from the global CPU generator: give it `seed` for the
    block, then restore it (in a main-process loader it also drives dropout and FLIP masks).
    Seeding a private generator and copying its state costs ~2 us; torch.manual_seed ~60 us."""
    saved = torch.get_rng_state()
    torch.set_rng_state(_seeder.manual_seed(seed).get_state())
    try:
        yield
    finally:
        torch.set_rng_state(saved)
