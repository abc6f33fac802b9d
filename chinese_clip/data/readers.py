"""Readers for the layouts image-text data comes in, all yielding `RawPair`s in a fixed order.

A reader never drops an input: a row it cannot use (invalid UTF-8, a missing image file, no
caption) comes out as a RawPair with `problem` set, so that the shard builder can account for
every input, either in a shard or in its quarantine report.

    table    CSV / TSV / jsonl with a caption column (text, caption) and an image column
             (image_path, image, filepath, file), paths relative to the table's directory;
             CSV fields may be quoted and span lines
    cn_clip  Chinese-CLIP's `{split}_imgs.tsv` (image_id <TAB> base64) + `{split}_texts.jsonl`
    lmdb     Chinese-CLIP's LMDB directory (`imgs/`, `pairs/`), as its build_lmdb_dataset.py writes
    folder   images with a caption file beside each (cat.jpg + cat.txt)
    tar      webdataset shards as img2dataset writes them (000001.jpg + 000001.txt or .json; see
             tars.py for how members group into samples), one .tar or a directory of them
    parquet  an image column (bytes, or {bytes: ...} as `datasets` stores images) and a caption
             column; one file or a directory of them (this project's shards included)

Tars and parquet files may also be named by an fsspec URL (s3://, https://, ...), a brace list
(`{00000..00099}.tar`) or a glob, and are then streamed from wherever they are.
"""
from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from chinese_clip.data.storage import file_name, is_remote, list_files, open_binary
from chinese_clip.data.tars import tar_samples

CAPTION_COLUMNS = ("text", "caption")
IMAGE_COLUMNS = ("image_path", "image", "filepath", "file")
UNDECODED = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, kept by errors="surrogateescape"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def image_files(directory: Path) -> list[Path]:
    """The image files in `directory` and its sub-folders, sorted by path (by extension; not opened)."""
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


@dataclass
class Part:
    """Input `index` of `count` (build_shards --part I/N): the source's units (its files, or its rows
    when it is one table) go round-robin to the parts, so N jobs split it disjointly without talking
    to each other. A reader counts the units it saw and kept, which the parts' check adds up."""
    index: int = 0
    count: int = 1
    unit: str = ""  # "files" or "rows", whichever the reader split
    seen: int = 0
    kept: int = 0

    def takes(self, position: int, unit: str) -> bool:
        self.unit, self.seen = unit, self.seen + 1
        mine = position % self.count == self.index
        self.kept += mine
        return mine

    def files(self, files: list) -> list:
        return [f for position, f in enumerate(files) if self.takes(position, "files")]


def part_argument(text: str) -> Part:
    """--part I/N as the data tools' argparse reads it."""
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and 0 <= int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, got {text!r}")
    return Part(int(index), int(count))


@dataclass
class RawPair:
    key: str  # where it came from, for reports: "train.csv:17", "train_texts.jsonl:3/123"
    caption: str | None
    image: bytes | None
    problem: str | None = None  # why the reader could not produce it whole


def read_pairs(source: str | Path, split: str = "train", part: Part | None = None) -> Iterator[RawPair]:
    """Every pair of `source` (of `part` of it), recognising its layout (see the module docstring).
    Tars and parquet files may also be named by URL (s3://..., https://...), brace list or glob."""
    source, part = str(source), part or Part()
    if is_remote(source) or any(c in source for c in "{*?["):
        files = list_files(source, (".tar", ".parquet"), "source")
        kinds = {Path(f).suffix.lower() for f in files}
        if len(kinds) > 1:
            raise ValueError(f"{source}: names both .tar and .parquet files; give them as two sources")
        return (read_tars if kinds == {".tar"} else read_parquet)(part.files(files))
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv", ".jsonl"):
            return read_table(path, part)
        if suffix in (".tar", ".parquet"):
            return (read_tars if suffix == ".tar" else read_parquet)(part.files([str(path)]))
        raise ValueError(f"{path}: expected a .csv, .tsv, .jsonl, .tar or .parquet file, or a directory")
    if (path / "imgs").is_dir() and (path / "pairs").is_dir():
        return read_cn_clip_lmdb(path, part)
    if (path / f"{split}_imgs.tsv").is_file():
        return read_cn_clip_tsv(path, split, part)
    for suffix, reader in ((".tar", read_tars), (".parquet", read_parquet)):
        if files := sorted(path.glob(f"*{suffix}")):
            return reader(part.files([str(f) for f in files]))
    return read_image_folder(path, part)


def _decode_line(raw: bytes, where: str) -> tuple[str | None, str | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8 at byte {e.start} of {where}"


def _pick(row: dict, columns: tuple[str, ...]) -> str | None:
    return next((row[c] for c in columns if row.get(c) not in (None, "")), None)


def read_table(path: Path, part: Part) -> Iterator[RawPair]:
    rows = _jsonl_rows(path) if path.suffix.lower() == ".jsonl" else _csv_rows(path)
    for position, (where, row, problem) in enumerate(rows):
        if not part.takes(position, "rows"):  # before its image is read
            continue
        if problem:
            yield RawPair(where, None, None, problem)
            continue
        caption, image_path = _pick(row, CAPTION_COLUMNS), _pick(row, IMAGE_COLUMNS)
        if image_path is None:
            yield RawPair(where, caption, None, f"no image column ({' or '.join(IMAGE_COLUMNS)})")
            continue
        file = path.parent / image_path
        if not file.is_file():
            yield RawPair(where, caption, None, f"image file not found: {image_path}")
            continue
        yield RawPair(where, caption, file.read_bytes())


def _csv_rows(path: Path) -> Iterator[tuple[str, dict | None, str | None]]:
    """Rows as the csv module reads them (a quoted field may hold newlines), keyed by their first line.
    Undecodable bytes survive as surrogates, so a row holding any is reported and the rest still read."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:  # streamed: tables can be huge
        reader = csv.reader(f, delimiter=delimiter)
        columns = next(reader, None)
        if columns is None:
            return
        if any(UNDECODED.search(c) for c in columns):
            raise ValueError(f"{path}: the header line is not UTF-8")
        first_line = reader.line_num + 1
        for fields in reader:
            where, first_line = f"{path.name}:{first_line}", reader.line_num + 1
            if any(UNDECODED.search(f) for f in fields):
                yield where, None, f"invalid UTF-8 in {where}"
            elif any(f.strip() for f in fields):
                yield where, dict(zip(columns, fields)), None


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict | None, str | None]]:
    with open(path, "rb") as f:  # streamed: tables can be huge
        for number, raw in enumerate(f, start=1):
            where = f"{path.name}:{number}"
            text, problem = _decode_line(raw.rstrip(b"\r\n"), where)
            if problem:
                yield where, None, problem
            elif text.strip():
                try:
                    yield where, json.loads(text), None
                except json.JSONDecodeError as e:
                    yield where, None, f"not JSON: {e.msg}"


def read_cn_clip_tsv(directory: Path, split: str, part: Part) -> Iterator[RawPair]:
    """One pair per (text, image id) of `{split}_texts.jsonl`; images from `{split}_imgs.tsv`."""
    images: dict[str, bytes] = {}
    for number, raw in enumerate((directory / f"{split}_imgs.tsv").read_bytes().splitlines(), start=1):
        image_id, _, b64 = raw.partition(b"\t")
        try:
            images[image_id.decode()] = base64.urlsafe_b64decode(b64)
        except (ValueError, UnicodeDecodeError):
            images[image_id.decode(errors="replace")] = b""  # decode_image names it an empty file
    for position, (where, row, problem) in enumerate(_jsonl_rows(directory / f"{split}_texts.jsonl")):
        if not part.takes(position, "rows"):
            continue
        if problem:
            yield RawPair(where, None, None, problem)
            continue
        for image_id in row.get("image_ids", []):
            key = f"{where}/{image_id}"
            if str(image_id) not in images:
                yield RawPair(key, row.get("text"), None, f"image id {image_id} not in {split}_imgs.tsv")
            else:
                yield RawPair(key, row.get("text"), images[str(image_id)])


class _NoGlobals(pickle.Unpickler):
    """cn_clip's records are plain tuples of ints and strings: a pickle that asks for any class or function
    is not one of them, and unpickling it would run whatever it names."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it asks for {module}.{name}")


def _cn_clip_record(data: bytes | None) -> tuple[int | str, str]:
    """(image_id, text) of one pairs/ record, or ValueError saying why not; never runs code."""
    if data is None:
        raise ValueError("missing")
    try:
        record = _NoGlobals(io.BytesIO(data)).load()
    except Exception as e:  # a hostile or broken pickle raises anything; none of it may stop the build
        raise ValueError(f"not a plain pickled tuple, not read ({e})") from None
    if not (isinstance(record, tuple) and len(record) == 3 and isinstance(record[0], (int, str))
            and isinstance(record[2], str)):
        raise ValueError(f"not an (image_id, text_id, text) tuple: {type(record).__name__}")
    return record[0], record[2]


def read_cn_clip_lmdb(directory: Path, part: Part) -> Iterator[RawPair]:
    """Chinese-CLIP's LMDB: pairs/ maps a sample index to a pickled (image_id, text_id, text), imgs/
    an image id to the base64 image. Downloaded LMDBs are third-party files: records are unpickled with
    no globals allowed, and one that needs any is a quarantined pair, not code run."""
    import lmdb

    pairs = lmdb.open(str(directory / "pairs"), readonly=True, lock=False, readahead=False)
    images = lmdb.open(str(directory / "imgs"), readonly=True, lock=False, readahead=False)
    with pairs.begin() as pair_txn, images.begin() as image_txn:
        count = int(pair_txn.get(b"num_samples").decode())
        for index in range(count):
            if not part.takes(index, "rows"):
                continue
            key = f"{directory.name}/pairs/{index}"
            try:
                image_id, text = _cn_clip_record(pair_txn.get(str(index).encode()))
            except ValueError as e:
                yield RawPair(key, None, None, f"record {e}")
                continue
            b64 = image_txn.get(str(image_id).encode())
            if b64 is None:
                yield RawPair(key, text, None, f"image id {image_id} not in imgs/")
            else:
                yield RawPair(key, text, base64.urlsafe_b64decode(b64))
    pairs.close()
    images.close()


def read_image_folder(directory: Path, part: Part) -> Iterator[RawPair]:
    for file in part.files(image_files(directory)):
        key = str(file.relative_to(directory))
        caption_file = file.with_suffix(".txt")
        if not caption_file.is_file():
            yield RawPair(key, None, file.read_bytes(), f"no caption file {caption_file.name}")
            continue
        caption, problem = _decode_line(caption_file.read_bytes(), caption_file.name)
        yield RawPair(key, caption.strip() if caption else None, file.read_bytes(), problem)



def read_tars(urls: list[str]) -> Iterator[RawPair]:
    for url in urls:
        name = file_name(url)
        for key, caption, image, problem in tar_samples(url):
            yield RawPair(f"{name}/{key}", caption, image, problem)


def read_parquet(urls: list[str]) -> Iterator[RawPair]:
    import pyarrow.parquet as pq

    for url in urls:
        name = file_name(url)
        with open_binary(url) as stream:
            yield from _parquet_pairs(name, pq.ParquetFile(stream))


def _parquet_pairs(name: str, file) -> Iterator[RawPair]:
    names = file.schema_arrow.names
    image_column = next((c for c in ("image", "jpg", "img", "image_bytes") if c in names), None)
    caption_column = next((c for c in CAPTION_COLUMNS if c in names), None)
    if image_column is None or caption_column is None:
        raise ValueError(f"{name}: expected an image column (image, jpg, img, image_bytes) and a caption "
                         f"column ({', '.join(CAPTION_COLUMNS)}); it has {names}")
    number = 0
    for batch in file.iter_batches(batch_size=256, columns=[image_column, caption_column]):
        for row in batch.to_pylist():
            image = row[image_column]
            if isinstance(image, dict):  # datasets' Image feature: {"bytes": ..., "path": ...}
                image = image.get("bytes")
            yield RawPair(f"{name}:{number}", row[caption_column], image, None if image else "no image bytes")
            number += 1
