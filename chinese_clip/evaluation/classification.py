"""Zero-shot classification: Chinese class names through prompt templates (averaged per class), images
through the vision tower; top-1, top-5 and per-class accuracy. One path and one result for every set:
a labelled folder here, the synthetic held-out splits (evaluation/synthetic.py).

The folder follows Chinese-CLIP's convention: one sub-folder per class, sorted by name, and a
`label_cn.txt` (in the folder or beside it) whose line i names the i-th sub-folder's class. The
result carries a hash of the label list and of the templates: three different Chinese ImageNet
label lists circulate, and numbers only compare under the same ones.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from chinese_clip.data.collate import ImageTextCollator
from chinese_clip.data.readers import image_files
from chinese_clip.data.transforms import eval_transform
from chinese_clip.evaluation.features import StoredImages, encode_images, evaluating
from chinese_clip.evaluation.zeroshot import class_embeddings
from chinese_clip.model import ChineseCLIP

LABEL_FILE = "label_cn.txt"
CN_CLIP = "cn_clip"  # labels: cn_clip is its ImageNet class names; templates: cn_clip:<name> one of its lists
DEFAULT_TEMPLATES = "openai"  # the list Chinese-CLIP's zeroshot_evaluation.py uses for ImageNet


def chinese_clip_templates(name: str = DEFAULT_TEMPLATES) -> list[str]:
    """A prompt template list shipped with cn_clip, as "{}" format strings: "openai" (183 prompts; what
    its zeroshot_evaluation.py uses for ImageNet and every dataset without its own), a dataset's own
    ("food", "aircraft", "eurosat", ... as cvinw_zeroshot_templates names them), or "imagenet" (the
    80 of imagenet_zeroshot_templates, which that script does not use)."""
    from cn_clip.eval import cvinw_zeroshot_templates, imagenet_zeroshot_templates

    if name == "imagenet":
        return [template("{}") for template in imagenet_zeroshot_templates.openai_imagenet_template]
    known = sorted(n.removesuffix("_templates") for n in dir(cvinw_zeroshot_templates) if n.endswith("_templates"))
    if name not in known:
        raise ValueError(f"cn_clip has no template list {name!r}; it has {', '.join(known)} and imagenet")
    return [template("{}") for template in getattr(cvinw_zeroshot_templates, f"{name}_templates")]


def read_templates(source: str | Path | None) -> list[str]:
    """Prompt templates from a file (one per line, {} for the class name), from cn_clip for
    "cn_clip:<name>" (see chinese_clip_templates), or cn_clip's default for None."""
    if source is None:
        return chinese_clip_templates()
    if str(source).startswith(f"{CN_CLIP}:"):
        return chinese_clip_templates(str(source).removeprefix(f"{CN_CLIP}:"))
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such template file")
    templates = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"{path}: expected one template per line, each with {{}} for the class name")
    return templates


def read_labels(directory: Path, labels: str | Path | None) -> tuple[list[str], str]:
    """(class names, where they came from): a label file, label_cn.txt in or beside `directory` for
    None, or the ImageNet class names in the cn_clip package for "cn_clip". Those differ from the
    label_cn.txt in Chinese-CLIP's repository (datasets/ImageNet-1K) in 241 of 1,000 names."""
    if labels == CN_CLIP:
        from cn_clip.eval.imagenet_zeroshot_templates import imagenet_classnames

        return list(imagenet_classnames), "cn_clip's imagenet_classnames"
    if labels is None:
        found = next((p for p in (directory / LABEL_FILE, directory.parent / LABEL_FILE) if p.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{directory}: no {LABEL_FILE} in it or beside it (one Chinese class name per "
                                    f"line), and no label file given")
        labels = found
    labels = Path(labels)
    if not labels.is_file():
        raise FileNotFoundError(f"{labels}: no such label file")
    names = [line.strip() for line in labels.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{labels} names no class")
    return names, str(labels)


def digest(lines: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]


@dataclass
class LabelledFolder:
    files: list[Path]
    labels: list[int]
    class_names: list[str]
    labels_from: str  # the label file, or cn_clip's list


def read_labelled_folder(directory: str | Path, labels: str | Path | None = None) -> LabelledFolder:
    """The images of each class sub-folder (sorted by name, as torchvision's ImageFolder and
    Chinese-CLIP sort them) with the class names of `labels` (see read_labels)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory")
    names, origin = read_labels(directory, labels)
    folders = sorted(p for p in directory.iterdir() if p.is_dir())
    if len(folders) != len(names):
        raise ValueError(f"{directory} has {len(folders)} class folders but {origin} names {len(names)} classes")
    files, labels = [], []
    for label, folder in enumerate(folders):
        images = image_files(folder)
        files += images
        labels += [label] * len(images)
    if not files:
        raise ValueError(f"{directory}: no images in any class folder")
    return LabelledFolder(files, labels, names, origin)


@dataclass
class ClassificationSet:
    """What a zero-shot classification scores, read once and evaluated as often as asked."""
    images: Sequence[bytes | Path | Image.Image]  # as StoredImages takes them
    labels: list[int]  # index into class_names, one per image
    class_names: list[str]
    templates: list[str]
    data: str  # where the images came from
    labels_from: str
    templates_from: str


def read_classification_set(directory: str | Path, labels: str | Path | None = None,
                            templates: str | Path | None = None) -> ClassificationSet:
    """A labelled folder (read_labelled_folder) with its prompt templates (read_templates)."""
    folder = read_labelled_folder(directory, labels)
    return ClassificationSet(folder.files, folder.labels, folder.class_names, read_templates(templates), str(directory),
                             folder.labels_from, str(templates or f"{CN_CLIP}:{DEFAULT_TEMPLATES}"))


def accuracy(logits: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> dict:
    """Top-1 and top-5 (%, ties broken by class order) and top-1 per class that has images."""
    ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices  # [N, k]
    correct = ranked[:, 0] == labels
    per_class = {class_names[c]: 100.0 * correct[labels == c].float().mean().item() for c in labels.unique().tolist()}
    return {"top1": 100.0 * correct.float().mean().item(),
            "top5": 100.0 * (ranked == labels[:, None]).any(dim=1).float().mean().item(), "per_class_top1": per_class}


def zero_shot_classification(model: ChineseCLIP, data: ClassificationSet, collator: ImageTextCollator,
                             device: torch.device, batch_size: int = 256, num_workers: int = 0) -> dict:
    """The result of every zero-shot classification (a labelled folder, the synthetic held-out splits):
    top-1, top-5 and per-class top-1 (%), the counts, the classes without images (candidates, never
    queries), and the hashes of the class names and templates. Images get the evaluation transform,
    decoded in `num_workers` DataLoader workers; every rank calls it together."""
    names = [str(image) if isinstance(image, Path) else f"{data.data} image {i}" for i, image in enumerate(data.images)]
    images = StoredImages(data.images, names, eval_transform(model.cfg.vision.image_size))
    with evaluating(model):
        classifier = class_embeddings(model, collator.tokenizer, data.class_names, data.templates, device,
                                      batch_size)  # [C, D]
        features = encode_images(model, images, collator, device, batch_size, num_workers)  # [N, D]
    present = set(data.labels)
    return {"task": "classification", "data": data.data, "images": len(data.labels), "classes": len(data.class_names),
            "empty_classes": [name for c, name in enumerate(data.class_names) if c not in present],
            "labels_from": data.labels_from, "labels_sha256": digest(data.class_names),
            "templates_from": data.templates_from, "templates": len(data.templates),
            "templates_sha256": digest(data.templates),
            **accuracy(features.cpu() @ classifier.float().cpu().T, torch.tensor(data.labels), data.class_names)}
