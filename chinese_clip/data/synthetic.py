"""The embedded synthetic dataset: coloured shapes with Chinese captions, drawn on demand.

Every image is a pure function of (seed, split, index), so the dataset costs no disk, needs no
download and is identical on every rank and every machine. A class is a colour x shape pair.
Four pairs never appear in training (split "novel"): they measure true zero-shot composition.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset


COLOURS = {  # name -> RGB; hues far apart so a tiny model separates them quickly
    "红色": (215, 40, 40),
    "橙色": (240, 135, 20),
    "黄色": (230, 210, 30),
    "绿色": (40, 165, 60),
    "蓝色": (40, 80, 220),
    "紫色": (145, 55, 185),
}
SHAPES = ["圆形", "正方形", "三角形", "星形"]
CLASSES = [(c, s) for c in COLOURS for s in SHAPES]  # 24 colour x shape classes
# One held-out colour per shape, no colour twice: the model has seen each word, never the pair.
NOVEL_CLASSES = {("黄色", "圆形"), ("绿色", "正方形"), ("蓝色", "三角形"), ("紫色", "星形")}

CAPTION_TEMPLATES = [
    "一个{colour}的{shape}",
    "{colour}{shape}",
    "图中有一个{size}的{colour}{shape}",
    "灰色背景上画着一个{colour}{shape}",
    "这张图片里是一个{size}{colour}{shape}",
    "一张{colour}{shape}的图片",
    "{size}{colour}{shape}，位于画面中间",
]
PROMPT_TEMPLATES = ["一个{}", "一张{}的图片", "图中是{}", "{}"]

SPLITS = {"train": 0, "val": 1, "novel": 2}
SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges at no real cost


def class_name(index: int) -> str:
    colour, shape = CLASSES[index]
    return f"{colour}{shape}"


def class_names() -> list[str]:
    return [class_name(i) for i in range(len(CLASSES))]


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "正方形":
        corners = [angle + math.pi / 4 + k * math.pi / 2 for k in range(4)]
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in corners]
    if shape == "三角形":
        corners = [angle - math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in corners]
    if shape == "星形":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            a = angle - math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
        return points
    raise ValueError(shape)


def draw_sample(rng: np.random.Generator, class_index: int, image_size: int) -> tuple[Image.Image, str]:
    """One image of `class_index` with its caption; all variation comes from `rng`."""
    colour, shape = CLASSES[class_index]
    side = image_size * SUPERSAMPLE
    grey = int(rng.integers(80, 180))
    background = tuple(int(np.clip(grey + rng.integers(-12, 13), 0, 255)) for _ in range(3))
    image = Image.new("RGB", (side, side), background)
    r = side * rng.uniform(0.26, 0.38)
    cx, cy = side / 2 + side * rng.uniform(-0.06, 0.06, size=2)
    fill = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in COLOURS[colour])
    draw = ImageDraw.Draw(image)
    if shape == "圆形":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r, rng.uniform(-0.15, 0.15)), fill=fill)
    image = image.resize((image_size, image_size), Image.BILINEAR)
    size_word = "大" if r > side * 0.32 else "小"
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    return image, template.format(colour=colour, shape=shape, size=size_word)


class SyntheticShapes(Dataset):
    """Map-style dataset of (PIL image, caption, class index, image id)."""

    def __init__(self, split: str, size: int, image_size: int, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        self.split, self.size, self.image_size, self.seed = split, size, image_size, seed
        novel = [i for i, c in enumerate(CLASSES) if c in NOVEL_CLASSES]
        self.classes = novel if split == "novel" else [i for i in range(len(CLASSES)) if i not in novel]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        label = self.classes[int(rng.integers(len(self.classes)))]
        image, caption = draw_sample(rng, label, self.image_size)
        return {"image": image, "text": caption, "label": label, "image_id": index}
