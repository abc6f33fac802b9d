"""A retrieval evaluation set in Chinese-CLIP's layout or from our shards, and its features from a model.

    {split}_imgs.tsv      image_id <TAB> base64 image (one line per image)
    {split}_texts.jsonl   {"text_id": ..., "text": "...", "image_ids": [...]} (one line per text)

Every malformed line is an error that names the file, the line and the id, before any feature is
computed: a text pointing at an image the tsv lacks would otherwise silently lower recall.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from chinese_clip.data.collate import ImageTextCollator
from chinese_clip.data.storage import is_remote, open_binary
from chinese_clip.data.stream import image_id, shard_files
from chinese_clip.evaluation.features import StoredImages, encode_images, encode_sharded, encode_texts, evaluating
from chinese_clip.model import ChineseCLIP


URL_SAFE = str.maketrans("-_", "+/")


@dataclass
class RetrievalSet:
    image_ids: list[str]
    images: list[bytes]  # encoded
    text_ids: list
    texts: list[str]
    text_to_images: list[list[int]]  # indices into images


def read_retrieval_set(directory: str | Path, split: str) -> RetrievalSet:
    directory = Path(directory)
    tsv, jsonl = directory / f"{split}_imgs.tsv", directory / f"{split}_texts.jsonl"
    for path in (tsv, jsonl):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (expected Chinese-CLIP's {split}_imgs.tsv + {split}_texts.jsonl)")
    index: dict[str, int] = {}
    images: list[bytes] = []
    for number, line in enumerate(tsv.read_text(encoding="utf-8").splitlines(), start=1):
        image_id, tab, b64 = line.partition("\t")
        if not tab:
            raise ValueError(f"{tsv}:{number}: expected image_id<TAB>base64")
        if image_id in index:
            raise ValueError(f"{tsv}:{number}: image {image_id} appears twice")
        try:  # either alphabet: Chinese-CLIP writes URL-safe base64, other tools the standard one
            images.append(base64.b64decode(b64.strip().translate(URL_SAFE), validate=True))
        except (binascii.Error, ValueError):
            raise ValueError(f"{tsv}:{number}: image {image_id} is not valid base64") from None
        index[image_id] = len(index)
    text_ids, texts, matches = [], [], []
    for number, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text_id, text, image_ids = row["text_id"], row["text"], row["image_ids"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{jsonl}:{number}: expected a JSON object with text_id, text and image_ids") from None
        if not image_ids:
            raise ValueError(f"{jsonl}:{number}: text {text_id} has no image_ids")
        if missing := [i for i in image_ids if str(i) not in index]:
            raise ValueError(f"{jsonl}:{number}: text {text_id} names image {missing[0]}, which {tsv.name} does not have")
        text_ids.append(text_id)
        texts.append(text)
        matches.append([index[str(i)] for i in image_ids])
    if not texts:
        raise ValueError(f"{jsonl}: no texts")
    return RetrievalSet(list(index), images, text_ids, texts, matches)


def is_shard_path(path: str | Path) -> bool:
    """Our shards (a .parquet file, a glob, a directory of them, a URL) rather than Chinese-CLIP's layout."""
    path = str(path)
    return (is_remote(path) or path.endswith(".parquet") or any(c in path for c in "*?[")
            or any(Path(path).glob("*.parquet")))


def read_shard_retrieval_set(path: str | Path) -> RetrievalSet:
    """Pairs from our shards (data_tools/build_shards.py) as a retrieval set. Shards hold pairs, not
    ids: an image is its bytes (byte-identical images are one image, as in training), a text its
    caption (a caption paired with several images matches each). Ids are each one's first row id
    (build_shards writes "00000-000012": shard, row), strings that name the pair in the shard; they are
    not Chinese-CLIP's integer ids, and shards carry no annotation file for its scripts to score."""
    images: list[bytes] = []
    image_ids: list[str] = []
    image_index: dict[int, int] = {}  # image hash -> index
    text_index: dict[str, int] = {}
    text_ids, texts, matches = [], [], []
    for file in shard_files(str(path), what="shards"):
        try:
            with open_binary(file) as stream:
                batches = pq.ParquetFile(stream).iter_batches(columns=["id", "caption", "image"])
                rows = [row for batch in batches for row in batch.to_pylist()]
            for row in rows:
                image = image_index.setdefault(image_id(row["image"]), len(image_index))
                if image == len(images):
                    images.append(row["image"])
                    image_ids.append(row["id"])
                text = text_index.setdefault(row["caption"], len(text_index))
                if text == len(texts):
                    text_ids.append(row["id"])
                    texts.append(row["caption"])
                    matches.append([])
                if image not in matches[text]:
                    matches[text].append(image)
        except (pa.ArrowException, KeyError) as e:
            raise ValueError(f"{file}: not a shard that data_tools/build_shards.py writes ({e})") from None
    if not texts:
        raise ValueError(f"{path}: the shards hold no pairs")
    return RetrievalSet(image_ids, images, text_ids, texts, matches)


def retrieval_features(model: ChineseCLIP, data: RetrievalSet, collator: ImageTextCollator, transform,
                       device: torch.device, batch_size: int = 256,
                       num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(text features [T, D], image features [I, D]), L2-normalised, on the CPU. Texts go through
    Chinese-CLIP's text preprocessing and the collator's tokenizer, images through `transform` and
    its normalisation, decoded in `num_workers` DataLoader workers."""
    with evaluating(model):
        text_features = encode_sharded(data.texts, lambda texts: encode_texts(model, collator.tokenizer, texts, device),
                                       batch_size, "texts").cpu()
        images = StoredImages(data.images, [f"image {name}" for name in data.image_ids], transform)
        image_features = encode_images(model, images, collator, device, batch_size, num_workers).cpu()
    return text_features, image_features
