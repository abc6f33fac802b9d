"""decode_image (and training's decode) on the inputs web data really holds: each broken one refused with its reason,
each odd one normalised to 8-bit RGB with the pixels a viewer would show."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from chinese_clip.data.images import BadImage, ImageRules, decode_image, encode_jpeg
from chinese_clip.data.transforms import UnusableSample, decode
from tests.conftest import animated, decompression_bomb, peak_memory_growth


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def photo(size=(96, 64)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: what a decompression bomb looks like before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"<html><body>404 Not Found</body></html>", "not an image"),
    (encoded(photo(), "JPEG")[:600], "truncated or corrupt"),  # cut inside the header
    (encoded(photo((256, 256)), "JPEG")[:8000], "truncated or corrupt"),  # cut inside the pixels
    (encoded(photo((1, 1)), "PNG"), "too small: 1x1"),
    (encoded(photo((20000, 10)), "PNG"), "too small: 20000x10"),
    (encoded(photo((600, 40)), "PNG"), "extreme aspect ratio: 600x40"),
    (png_header_only(100_000, 100_000), "decompression bomb"),
    (png_header_only(9000, 9000), "decompression bomb: 9000x9000 pixels"),
])
def test_unusable_images_are_refused_with_their_reason(data, reason):
    with pytest.raises(BadImage, match=reason):
        decode_image(data)


def test_alpha_and_palette_images_are_composited_on_white():
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 32, 64))  # left half fully transparent
    out = np.asarray(decode_image(encoded(rgba, "PNG")))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert (out[:, :32] == 255).all() and (out[:, 32:] == (255, 0, 0)).all()
    gif = np.asarray(decode_image(encoded(rgba.convert("RGB").convert("P"), "GIF")))
    assert gif.shape == (64, 64, 3) and (gif[:, 32:] == (255, 0, 0)).all()


def test_cmyk_grayscale_and_16_bit_images_become_8_bit_rgb():
    cmyk = np.asarray(decode_image(encoded(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG", quality=100)))
    assert cmyk.shape == (64, 64, 3) and abs(int(cmyk[..., 0].mean()) - 255) <= 3 and cmyk[..., 1].mean() < 5
    deep = Image.fromarray(np.full((48, 48), 40000, dtype=np.uint16))  # 16-bit grey: 40000 / 65535 of white
    assert deep.mode.startswith("I")
    out = np.asarray(decode_image(encoded(deep, "PNG")))
    assert out.shape == (48, 48, 3) and (out == round(40000 * 255 / 65535)).all()
    grey = np.asarray(decode_image(encoded(Image.new("L", (40, 40), 77), "PNG")))
    assert (grey == 77).all()


def test_large_images_shrink_to_the_short_side_and_round_trip_as_jpeg():
    image = decode_image(encoded(photo((400, 200)), "PNG"), ImageRules(max_short_side=100))
    assert image.size == (200, 100)
    again = decode_image(encode_jpeg(image))
    assert again.size == (200, 100) and again.mode == "RGB"
    assert decode_image(encoded(photo((90, 60)), "PNG"), ImageRules(max_short_side=100)).size == (90, 60)


def test_a_decompression_bomb_is_refused_from_its_header_before_any_pixel_is_decoded():
    """Both decoders (PIL for build_shards, torchvision for training, evaluation, the index and the search
    server) ask the header first: a 48 KB PNG that decodes to 1.2 GB costs what its header does."""
    bomb = decompression_bomb()
    with peak_memory_growth() as grown:
        with pytest.raises(BadImage, match="decompression bomb"):
            decode_image(bomb)
        with pytest.raises(UnusableSample, match="decompression bomb"):
            decode(bomb)
    assert grown["MiB"] < 64, grown  # decoding it took 1146 MiB; the refusal reads 48 KB


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_an_animation_decodes_to_its_first_frame(fmt):
    data = animated(fmt)
    pixels = decode(data)
    assert pixels.shape == (3, 48, 48)
    assert pixels[:, 24, 24].tolist() == pytest.approx([220, 30, 30], abs=8)  # GIF's palette, WebP's lossy colour
    assert decode_image(data).getpixel((24, 24)) == tuple(pixels[:, 24, 24].tolist())
