"""A feature index of an image folder or of our shards, for text-to-image and image-to-image search.

    INDEX/index.json           the model it was built with, the source (and a folder's absolute path), the feature size
    INDEX/parts/N.safetensors  features [n, D] of one batch of images (fp16, unit length)
    INDEX/parts/N.jsonl        those images, one line each: key (a path under the folder, or shard#id),
                               stamp, and for a shard image its thumbnail and caption
    INDEX/thumbs/              thumbnails of shard images (a folder's images are shown from their files)

The index directory never overlaps the source (a `--rebuild` would delete the photos), and
`remove_index` deletes only the files above. What an index names is not trusted to be a path to
serve: `image_path` gives only image files under the folder or the thumbnails.

Building is incremental: images already indexed with the same size and modification time are kept,
new or changed ones are encoded, removed ones dropped. Features are written a part at a time (a
part is complete once its .jsonl exists), so a build that is interrupted keeps what it encoded and
the next build continues from there.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import fsspec
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from chinese_clip.checkpoints import model_stamp
from chinese_clip.data.images import BadImage, open_image, to_rgb
from chinese_clip.data.readers import IMAGE_SUFFIXES, image_files
from chinese_clip.data.storage import open_binary, overlaps
from chinese_clip.data.stream import shard_files
from chinese_clip.evaluation.retrieval_set import is_shard_path
from chinese_clip.inference import Predictor

INDEX_FILE = "index.json"
FORMAT = 2  # 2: folder images are the folder's path + their key, not a stored path
PART_SIZE = 4096  # images encoded between two writes: what an interruption can lose
THUMB_SIZE = 256
_PART = re.compile(r"(\d+)\.jsonl")
_WRITTEN = {"parts": re.compile(r"\.?\d+\.(jsonl|safetensors|jsonl\.partial)"), "thumbs": re.compile(r"[0-9a-f]{16}\.jpg")}


class SearchIndexError(ValueError):
    """An index that cannot serve the request (another model, a missing directory)."""


@dataclass
class Hit:
    rank: int
    score: float  # cosine similarity
    key: str  # the image's path relative to the folder, or shard#row id
    image: str  # a file to show: the image itself, or its thumbnail in the index
    caption: str | None

    def to_dict(self) -> dict:
        return {"rank": self.rank, "score": round(self.score, 6), "key": self.key, "image": self.image,
                **({"caption": self.caption} if self.caption is not None else {})}


class ImageIndex:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.meta: dict = {}
        self.items: list[dict] = []
        self.features = torch.empty(0, 0)

    @property
    def parts(self) -> Path:
        return self.directory / "parts"

    @classmethod
    def open(cls, directory: str | Path) -> "ImageIndex":
        index = cls(directory)
        meta = index.directory / INDEX_FILE
        if not meta.is_file():
            raise SearchIndexError(f"{index.directory}: not an image index (no {INDEX_FILE}); build one with "
                                   "`recipes/predict.py index`")
        index.meta = json.loads(meta.read_text(encoding="utf-8"))
        if index.meta.get("format") != FORMAT:
            raise SearchIndexError(f"{index.directory}: an index of format {index.meta.get('format')}, this version "
                                   f"reads {FORMAT}: rebuild it (`predict.py index --rebuild`)")
        index._read_parts()
        return index

    def _part_numbers(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.parts.glob("*.jsonl") if (m := _PART.fullmatch(p.name))) \
            if self.parts.is_dir() else []

    def _read_parts(self) -> None:
        """Every complete part, in order; an image in several parts (a compaction cut short) counts once, as
        its latest part has it."""
        rows: dict[str, tuple[dict, torch.Tensor]] = {}
        for number in self._part_numbers():
            features = load_file(str(self.parts / f"{number}.safetensors"))["features"]
            lines = (self.parts / f"{number}.jsonl").read_text(encoding="utf-8").splitlines()
            for line, feature in zip(lines, features):
                item = json.loads(line)
                rows.pop(item["key"], None)
                rows[item["key"]] = (item, feature)
        self.items = [item for item, _ in rows.values()]
        dim = self.meta.get("dim", 0)
        # fp16 on disk, fp32 in memory: CPU matmuls in fp16 are slow, and a query must not convert the whole index
        self.features = torch.stack([f for _, f in rows.values()]).float() if rows else torch.empty(0, dim)

    def _write_part(self, items: list[dict], features: torch.Tensor) -> None:
        numbers = self._part_numbers()
        number = numbers[-1] + 1 if numbers else 0
        self.parts.mkdir(parents=True, exist_ok=True)
        save_file({"features": features.to(torch.float16).contiguous()}, str(self.parts / f"{number}.safetensors"))
        partial = self.parts / f".{number}.jsonl.partial"
        partial.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
        os.replace(partial, self.parts / f"{number}.jsonl")  # the part counts from here on

    def _compact(self, keep: list[int]) -> None:
        """One part of the kept images, replacing every older part."""
        old = self._part_numbers()
        if keep:
            self._write_part([self.items[i] for i in keep], self.features[keep])
        for number in old:
            (self.parts / f"{number}.jsonl").unlink()
            (self.parts / f"{number}.safetensors").unlink(missing_ok=True)
        self._read_parts()

    def check_model(self, model_path: str | Path) -> None:
        """Features of another model (or of the same path's weights since retrained) mean nothing here."""
        stamp = model_stamp(model_path)
        if self.meta["model"] != stamp:
            raise SearchIndexError(f"{self.directory} was built with {self.meta['model']['path']} as it was then; "
                                   f"{stamp['path']} differs: rebuild the index (`predict.py index --rebuild`) or "
                                   "index into another directory")

    # -- building -------------------------------------------------------------------------------------
    def build(self, source: str, predictor: Predictor, model_path: str | Path, say=print) -> dict:
        """Index `source` (an image folder, or our shards) with `predictor`, keeping what is already indexed
        and unchanged. Returns counts: kept, added, removed."""
        check_apart(self.directory, source)
        stamp = model_stamp(model_path)
        meta_file = self.directory / INDEX_FILE
        if meta_file.is_file():
            existing = ImageIndex.open(self.directory)
            existing.check_model(model_path)
            if existing.meta["source"] != source:
                raise SearchIndexError(f"{self.directory} indexes {existing.meta['source']}, not {source}; "
                                       "give each source its own index")
            self.items, self.features = existing.items, existing.features
        self.directory.mkdir(parents=True, exist_ok=True)
        kind = "shards" if is_shard_path(source) else "folder"
        self.meta = {"format": FORMAT, "source": source, "kind": kind, "model": stamp, "dim": predictor.dim,
                     **({"folder": str(Path(source).resolve())} if kind == "folder" else {})}
        meta_file.write_text(json.dumps(self.meta, indent=2, ensure_ascii=False), encoding="utf-8")
        found = dict(self._scan(source))
        keep = [i for i, item in enumerate(self.items) if found.get(item["key"], {}).get("stamp") == item["stamp"]]
        removed = len(self.items) - len(keep)
        if removed:
            self._compact(keep)
        indexed = {item["key"] for item in self.items}
        new = [item for key, item in found.items() if key not in indexed]
        say(f"index {self.directory}: {len(indexed)} images kept, {len(new)} to encode, {removed} removed or changed")
        unreadable: list[str] = []
        for items, images in self._batches(new):
            features, errors = predictor.encode_readable(images)
            readable = ~features.isnan().any(dim=1)
            unreadable += errors
            self._write_part([item for item, ok in zip(items, readable.tolist()) if ok], features[readable])
        self._read_parts()
        if unreadable:
            say(f"skipped {len(unreadable)} images that do not decode (the first: {unreadable[0]})")
        return {"kept": len(indexed), "added": len(new) - len(unreadable), "removed": removed,
                "unreadable": unreadable, "images": len(self.items)}

    def _scan(self, source: str) -> Iterator[tuple[str, dict]]:
        """(key, item) of every image the source holds now; shards are listed by their ids alone."""
        if is_shard_path(source):
            for file in shard_files(source, what="index source"):
                fs, inner = fsspec.core.url_to_fs(file)
                stamp = [fs.size(inner)]
                with open_binary(file) as stream:
                    ids = pq.ParquetFile(stream).read(columns=["id"]).column("id").to_pylist()
                for row_id in ids:
                    key = f"{Path(file).name}#{row_id}"
                    yield key, {"key": key, "shard": file, "row": row_id, "stamp": stamp}
            return
        folder = Path(source)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder (expected a folder of images, or our .parquet shards)")
        files = image_files(folder)
        if not files:
            raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in it or its sub-folders")
        for file in files:
            status = file.stat()
            key = file.relative_to(folder).as_posix()
            yield key, {"key": key, "stamp": [status.st_size, status.st_mtime_ns]}

    def _batches(self, new: list[dict]) -> Iterator[tuple[list[dict], list]]:
        """(items, what to encode) a part at a time: a folder's files, or a shard's images (read once per
        shard, each given a thumbnail to show and its caption)."""
        by_shard: dict[str, list[dict]] = {}
        folder = Path(self.meta.get("folder", ""))
        for item in new:
            by_shard.setdefault(item.get("shard", ""), []).append(item)
        for shard, items in by_shard.items():
            if shard:
                wanted = {item["row"]: item for item in items}
                with open_binary(shard) as stream:
                    rows = pq.ParquetFile(stream).read(columns=["id", "caption", "image"]).to_pylist()
                images = {}
                for row in rows:
                    if (item := wanted.get(row["id"])) is not None:
                        item.update(image=self._thumbnail(item["key"], row["image"]), caption=row["caption"])
                        images[row["id"]] = row["image"]
                sources = [images[item["row"]] for item in items]
            else:
                sources = [folder / item["key"] for item in items]
            for start in range(0, len(items), PART_SIZE):
                yield items[start:start + PART_SIZE], sources[start:start + PART_SIZE]

    def _thumbnail(self, key: str, data: bytes) -> str:
        """A small JPEG of a shard image, for pages to show (the shard itself cannot be linked to)."""
        name = f"thumbs/{hashlib.sha1(key.encode()).hexdigest()[:16]}.jpg"
        target = self.directory / name
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                image = to_rgb(open_image(data))
                image.thumbnail((THUMB_SIZE, THUMB_SIZE))
                image.save(target, format="JPEG", quality=85)
            except (BadImage, OSError):  # encoding reports the image by name; there is just no thumbnail
                pass
        return name

    # -- searching ------------------------------------------------------------------------------------
    def image_path(self, item: dict) -> Path:
        """The file that shows the item: a folder's image, or a shard image's thumbnail in the index. An
        index is a file anyone can edit or download: what it names must be an image file under the folder
        or the thumbnails, never /etc/passwd."""
        if self.meta["kind"] == "folder":
            base, name = Path(self.meta["folder"]), item["key"]
        else:
            base, name = self.directory, item.get("image", "")
        parts = Path(name).parts
        inside = parts and not Path(name).is_absolute() and ".." not in parts and (
            self.meta["kind"] == "folder" or (parts[0] == "thumbs" and len(parts) == 2))
        if not inside or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            raise SearchIndexError(f"{self.directory}: {name!r} is not an image file under {base}")
        return base / name

    def search(self, query: torch.Tensor, k: int = 10) -> list[Hit]:
        """The `k` images closest to `query` ([D] unit features), best first."""
        if not self.items:
            return []
        scores = self.features @ query.float().reshape(-1)
        top = scores.topk(min(k, len(scores)))
        return [Hit(rank + 1, score, self.items[i]["key"], str(self.image_path(self.items[i])), self.items[i].get("caption"))
                for rank, (score, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()))]


def check_apart(index_dir: str | Path, source: str) -> None:
    """The index would index its own thumbnails, and a `--rebuild` would take the user's images with it."""
    if overlaps(index_dir, source):
        raise SearchIndexError(f"--index {index_dir} overlaps --source {source}: give the index a directory of its "
                               "own, outside the source and not holding it")


def remove_index(index_dir: str | Path) -> None:
    """Delete an index: only the files `build` writes, and the directories if that empties them (the
    directory may hold the user's other files)."""
    directory = Path(index_dir)
    if not (directory / INDEX_FILE).is_file():
        return
    for sub, written in _WRITTEN.items():
        if (directory / sub).is_dir() and not (directory / sub).is_symlink():  # a link leads out of the index
            for file in (directory / sub).iterdir():
                if file.is_file() and written.fullmatch(file.name):
                    file.unlink()
            _remove_if_empty(directory / sub)
    (directory / INDEX_FILE).unlink()
    _remove_if_empty(directory)


def _remove_if_empty(directory: Path) -> None:
    if not any(directory.iterdir()):
        directory.rmdir()
