"""A trained model put to work: Chinese texts and images to unit features, and zero-shot classification.

    from chinese_clip.inference import load_model

    model = load_model("runs/my_run/model")            # ours, an HF ChineseCLIPModel dir, or a Chinese-CLIP .pt
    model.classify("cat.jpg", ["猫", "狗", "汽车"])      # {"猫": 0.93, "狗": 0.05, "汽车": 0.02}
    images = model.encode_images(["a.jpg", "b.png"])   # [2, D], unit length
    texts = model.encode_texts(["一只猫", "一辆红色的汽车"])  # [2, D]
    similarity = texts @ images.T

Images are preprocessed exactly as evaluation does (Chinese-CLIP's square bicubic resize, the run's
normalisation) and texts as Chinese-CLIP does; encoding is batched, on the GPU when there is one and
under bf16 autocast where the GPU has bf16.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import torch
from PIL import Image

from chinese_clip.checkpoints import load_for_export, pretrained_vocab
from chinese_clip.data.collate import ImageTextCollator
from chinese_clip.data.transforms import eval_transform
from chinese_clip.evaluation.classification import read_templates
from chinese_clip.evaluation.features import StoredImages, encode_images, encode_sharded, encode_texts
from chinese_clip.evaluation.zeroshot import class_embeddings
from chinese_clip.model import MAX_LOGIT_SCALE, ChineseCLIP
from chinese_clip.runtime import resolve_mixed_precision
from chinese_clip.tokenizer import ChineseTokenizer, load_tokenizer

ImageInput = Union[str, Path, bytes, Image.Image]  # a file, its encoded bytes, or a decoded image


class Predictor:
    """A model in eval mode with its tokenizer and image preprocessing. Every method takes one item or
    a sequence of them; features come back as float32 CPU tensors [N, D] of unit length."""

    def __init__(self, model: ChineseCLIP, tokenizer: ChineseTokenizer, mean: Sequence[float],
                 std: Sequence[float], device: str | torch.device = "auto", precision: str = "auto",
                 batch_size: int = 64, num_workers: int = 0):
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.collator = ImageTextCollator(tokenizer, tuple(mean), tuple(std))
        self.transform = eval_transform(model.cfg.vision.image_size)
        auto_bf16 = self.device.type == "cuda" and resolve_mixed_precision("auto") == "bf16"
        self.bf16 = precision == "bf16" or (precision == "auto" and auto_bf16)
        self.batch_size, self.num_workers = batch_size, num_workers

    @property
    def dim(self) -> int:
        return self.model.cfg.embed_dim

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @torch.no_grad()
    def encode_images(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """[N, D]. Files are read and decoded in the predictor's DataLoader workers; an unreadable one is a
        ValueError naming it."""
        items = []
        for image in _as_list(images, (str, Path, bytes, Image.Image)):
            if isinstance(image, (str, Path)):
                image = Path(image)
                if not image.is_file():
                    raise FileNotFoundError(f"{image}: no such image file")
            items.append(image)
        if not items:
            return torch.empty(0, self.dim)
        with self._autocast():
            return encode_images(self.model, self._stored(items), self.collator, self.device, self.batch_size,
                                 self.num_workers).cpu()

    def _stored(self, images: list) -> StoredImages:
        """`images` as evaluation loads them, each named by its file or its place in the list."""
        names = [str(image) if isinstance(image, Path) else f"image {i}" for i, image in enumerate(images)]
        return StoredImages(images, names, self.transform)

    @torch.no_grad()
    def encode_readable(self, images: Sequence[Path | bytes]) -> tuple[torch.Tensor, list[str]]:
        """([N, D], errors): like encode_images, but an image that does not decode gets a row of NaN and
        its error in the list instead of stopping the batch (an index of a user's folder skips it)."""
        stored = self._stored(list(images))
        errors: list[str] = []

        def collate(samples: list[tuple]) -> tuple[torch.Tensor | None, torch.Tensor, list[str]]:
            readable = torch.tensor([pixels is not None for pixels, _ in samples])
            pixels = [p for p, _ in samples if p is not None]
            return (self.collator.pixel_batch(pixels) if pixels else None), readable, [e for _, e in samples if e]

        def encode(batch) -> torch.Tensor:
            pixels, readable, batch_errors = batch
            errors.extend(batch_errors)
            features = torch.full((len(readable), self.dim), float("nan"), device=self.device)
            if pixels is not None:
                features[readable.to(self.device)] = self.model.encode_image(pixels.to(self.device)).float()
            return features

        if not stored.images:
            return torch.empty(0, self.dim), []
        with self._autocast():
            features = encode_sharded(stored, encode, self.batch_size, "images", collate, self.num_workers).cpu()
        return features, errors

    @torch.no_grad()
    def encode_texts(self, texts: str | Sequence[str]) -> torch.Tensor:
        """[N, D], each text preprocessed as Chinese-CLIP does and cut at the context length."""
        texts = _as_list(texts, (str,))
        if not texts:
            return torch.empty(0, self.dim)
        with self._autocast():
            return encode_sharded(texts, lambda batch: encode_texts(self.model, self.tokenizer, batch, self.device),
                                  self.batch_size, "texts").cpu()

    @torch.no_grad()
    def classifier(self, labels: Sequence[str], templates: str | Sequence[str] | None = None) -> torch.Tensor:
        """[C, D]: each label's prompts (`templates` with {} for the label: a list, a file, "cn_clip:<name>",
        or None for the 183 Chinese-CLIP uses on ImageNet) averaged, as in zero-shot evaluation."""
        labels = _as_list(labels, (str,))
        if not labels:
            raise ValueError("give at least one label")
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels repeat: {sorted({label for label in labels if labels.count(label) > 1})}")
        if templates is None or isinstance(templates, (str, Path)):
            templates = read_templates(templates)
        elif not templates or any("{}" not in t for t in templates):
            raise ValueError("templates: give at least one, each with {} where the label goes")
        with self._autocast():
            return class_embeddings(self.model, self.tokenizer, labels, templates, self.device, self.batch_size).float().cpu()

    def logit_scale(self) -> float:
        return self.model.logit_scale.detach().float().clamp(max=MAX_LOGIT_SCALE).exp().item()

    def classify(self, images: ImageInput | Sequence[ImageInput], labels: Sequence[str],
                 templates: str | Sequence[str] | None = None) -> dict[str, float] | list[dict[str, float]]:
        """Per-label probabilities (softmax over the labels of the model's scaled cosine similarities, as
        Chinese-CLIP's zero-shot classifier): a dict for one image, a list of dicts for a sequence."""
        single = isinstance(images, (str, Path, bytes, Image.Image))
        probabilities = self.probabilities(self.encode_images(images), self.classifier(labels, templates))
        rows = [dict(zip(labels, row)) for row in probabilities.tolist()]
        return rows[0] if single else rows

    def probabilities(self, image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
        """[N, C] from [N, D] image features and a [C, D] classifier."""
        return (self.logit_scale() * image_features @ classifier.T).softmax(dim=-1)


def _as_list(items, single: tuple[type, ...]) -> list:
    return [items] if isinstance(items, single) else list(items)


def load_model(path: str | Path, device: str | torch.device = "auto", precision: str = "auto",
               batch_size: int = 64, num_workers: int = 0, model_name: str | None = None) -> Predictor:
    """Any model `load_pretrained` reads (a run's model/ or best/, an export, an HF ChineseCLIPModel
    directory, a Chinese-CLIP .pt) with the tokenizer and normalisation it was trained with."""
    model, cfg = load_for_export(path, model_name)
    tokenizer = load_tokenizer(pretrained_vocab(path), cfg.data.context_length)
    return Predictor(model, tokenizer, cfg.data.mean, cfg.data.std, device, precision, batch_size, num_workers)
