"""Image bytes -> a clean RGB image, or the reason it cannot be used.

Web-scale image-text data holds every kind of broken or odd file: zero bytes, HTML saved as .jpg,
truncated downloads, decompression bombs, palette and alpha images, CMYK JPEGs, 16-bit PNGs,
slivers. `open_image` reads the header and refuses bombs before any pixel is decoded (every decoder
in the product asks it first); `decode_image` decodes once, refuses the unusable with a short reason
(for quarantine reports and skip counters) and normalises the rest to 8-bit RGB; `encode_jpeg`
writes it back.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError


@dataclass(frozen=True)
class ImageRules:
    min_side: int = 32  # shorter side, pixels: smaller is an icon or a tracking pixel
    max_aspect: float = 6.0  # longer side / shorter side: beyond it, banners and slivers
    max_pixels: int = 8192 * 8192  # width x height in the header; more is a decompression bomb (PIL caps it at ~179M)
    max_short_side: int | None = None  # resize (keeping the aspect) so the shorter side is at most this


class BadImage(ValueError):
    """An image that cannot be used; str() is the reason."""


def open_image(data: bytes, max_pixels: int = ImageRules.max_pixels) -> Image.Image:
    """The image with its header read and nothing decoded yet; BadImage when it is not an image or its
    header promises more than `max_pixels` (a decompression bomb: a 400 KB PNG can declare 20000x20000)."""
    if not data:
        raise BadImage("empty file")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except UnidentifiedImageError:
        raise BadImage("not an image") from None
    except Image.DecompressionBombError as e:  # PIL's own limit, twice its MAX_IMAGE_PIXELS
        raise BadImage(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:  # cut off inside the header
        raise BadImage(f"truncated or corrupt: {e}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadImage(f"decompression bomb: {width}x{height} pixels")
    return image


def decode_image(data: bytes, rules: ImageRules = ImageRules()) -> Image.Image:
    """8-bit RGB (an animation's first frame), alpha composited on white, resized if the rules say so;
    else BadImage(reason)."""
    image = open_image(data, rules.max_pixels)
    width, height = image.size
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as e:  # a truncated download stays an error, never grey pixels
        raise BadImage(f"truncated or corrupt: {e}") from None
    if problem := size_problem(width, height, rules):
        raise BadImage(problem)
    image = to_rgb(image)
    short = min(width, height)
    if rules.max_short_side is not None and short > rules.max_short_side:
        scale = rules.max_short_side / short
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.BICUBIC, reducing_gap=3.0)
    return image


def size_problem(width: int, height: int, rules: ImageRules = ImageRules()) -> str | None:
    """Why an image of this size teaches nothing, or None."""
    if min(width, height) < rules.min_side:
        return f"too small: {width}x{height}, shorter side under {rules.min_side}"
    if max(width, height) / min(width, height) > rules.max_aspect:
        return f"extreme aspect ratio: {width}x{height}"
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """Palette, alpha, CMYK, grayscale and 16-bit images as 8-bit RGB. Transparent pixels become white,
    as on the web page the image came from, not the black of dropping the alpha channel."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        image = Image.fromarray(np.clip(pixels * 255.0 / top + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode in ("RGB", "L") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def encode_jpeg(image: Image.Image, quality: int = 95) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()
