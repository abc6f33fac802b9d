"""Where data lives: local paths or fsspec URLs (s3://, gs://, hf://, https://, ...), with bash-style
brace lists (`shards/{00000..09999}.tar`) and globs.

Files are opened as streams, never downloaded whole. Credentials come only from where each
filesystem's own library looks (for S3: AWS_* variables, ~/.aws/config and credentials, including
AWS_ENDPOINT_URL for S3-compatible servers); messages name URLs and nothing else.
"""
from __future__ import annotations

import itertools
import os
from collections import defaultdict
from pathlib import Path
from typing import IO

import fsspec
from braceexpand import braceexpand
from fsspec.implementations.local import LocalFileSystem

from chinese_clip.config import ConfigError

GLOB_CHARACTERS = "*?["


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def file_name(path: str) -> str:
    """The last component of a local path or a URL."""
    return path.rstrip("/").rsplit("/", 1)[-1]


def open_binary(path: str) -> IO[bytes]:
    """A file object reading `path` as a stream (remote files in blocks, as they are read)."""
    return fsspec.open(path, "rb").open()


def list_files(path: str, suffixes: tuple[str, ...], what: str) -> list[str]:
    """The files `path` names: itself, the files with `suffixes` in a directory, a glob's matches, or
    each entry of a brace list. Errors are ConfigErrors that begin with `what` and name the entry."""
    entries = list(braceexpand(path))
    if len(entries) > 1 and not any(c in path for c in GLOB_CHARACTERS):
        return _listed_files(entries, what)
    files = []
    for entry in entries:
        fs, inner = fsspec.core.url_to_fs(entry)
        if any(c in inner for c in GLOB_CHARACTERS):
            found = sorted(fs.glob(inner))
            if not found:
                raise ConfigError(f"{what}: {entry} matches no file")
        elif fs.isdir(inner):
            found = sorted(e["name"] for e in fs.ls(inner, detail=True)
                           if e["type"] == "file" and e["name"].lower().endswith(suffixes))
            if not found:
                raise ConfigError(f"{what}: {entry} holds no {' or '.join(suffixes)} files")
        elif fs.isfile(inner):
            found = [inner]
        else:
            raise ConfigError(f"{what}: {entry}: no such file or directory")
        files += [full_path(fs, p, entry) for p in found]
    return files


def _listed_files(entries: list[str], what: str) -> list[str]:
    """A brace list of files, checked with one listing per directory rather than one request per file
    (on object storage, a list of 10,000 tars would otherwise be 10,000 round trips)."""
    by_directory: dict[str, list[str]] = defaultdict(list)
    for entry in entries:
        by_directory[entry.rsplit("/", 1)[0] if "/" in entry else "."].append(entry)
    for directory, wanted in by_directory.items():
        fs, inner = fsspec.core.url_to_fs(directory)
        present = set(fs.ls(inner, detail=False)) if fs.isdir(inner) else set()
        missing = [entry for entry in wanted if fsspec.core.url_to_fs(entry)[1] not in present]
        if missing:
            more = f" (and {len(missing) - 1} more of the list)" if len(missing) > 1 else ""
            raise ConfigError(f"{what}: {missing[0]}: no such file or object{more}")
    return entries


def full_path(fs: fsspec.AbstractFileSystem, inner: str, entry: str) -> str:
    """What `fs` lists, as the rest of the code names files: a local file as a plain path (relative
    if `entry` was), a remote one as a full URL."""
    if isinstance(fs, LocalFileSystem):
        return inner if entry.startswith(("/", "file://")) else os.path.relpath(inner)
    return fs.unstrip_protocol(inner)


def local_path(source: str) -> Path | None:
    """The local directory (or file) a source names, up to its first glob or brace list; None for a URL."""
    if is_remote(source):
        return None
    parts = Path(source.removeprefix("file://")).parts
    fixed = list(itertools.takewhile(lambda part: not any(c in part for c in "*?[{"), parts))
    return Path(*fixed) if fixed else Path(".")


def overlaps(directory: str | Path, source: str) -> bool:
    """Whether a directory a tool writes (and may later delete from) is, holds or lies inside a local
    source: the user's data must never be in the way of a rebuild."""
    local = local_path(source)
    if local is None:
        return False
    written, read = Path(directory).resolve(), local.resolve()
    return written == read or written.is_relative_to(read) or read.is_relative_to(written)
