"""webdataset tars (img2dataset's output): image-caption samples streamed out of local or remote
tars one at a time.

Member names are split into sample key and extension by webdataset's own rule (`base_plus_ext`):
the key is the member's directory plus its basename up to the basename's first dot
(`./000000.jpg` and `./000000.txt` are sample `./000000`; `a.b/0001.jpg` is `a.b/0001`). Where we
must differ from webdataset is order: it groups only adjacent members, so a tar made with
`tar -cf x.tar .` (members in directory order, a sample's image and caption apart) would come out as
halves. Here a run of adjacent members that lacks its image or caption waits for the rest of its
key until the tar ends; whole samples stream out at once, so only incomplete ones are ever held.
The caption is `.txt`, else `.json`'s caption or text; the image `.jpg`, `.jpeg`, `.png` or `.webp`.
"""
from __future__ import annotations

import json
import tarfile
from typing import Iterator

from webdataset.tariterators import base_plus_ext, tar_file_iterator

from chinese_clip.data.storage import open_binary

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "json")

Sample = tuple[str, str | None, bytes | None, str | None]  # key, caption, image, problem


def tar_samples(url: str) -> Iterator[Sample]:
    """(key, caption, image, problem) for each sample of one tar. A problem says why the sample
    cannot be used whole; a tar cut short ends with the samples it cut, each with a problem."""
    waiting: dict[str, dict[str, bytes]] = {}  # incomplete samples by key
    key, files = None, {}

    def finish(key: str, files: dict[str, bytes]) -> Iterator[Sample]:
        """A run of adjacent members ended: its sample goes out if whole now, else waits for the rest."""
        merged = {**waiting.pop(key, {}), **files}
        if _whole(merged):
            yield key, *caption_and_image(key, merged)
        else:
            waiting[key] = merged

    with open_binary(url) as stream:
        try:
            for member in tar_file_iterator(stream):
                member_key, extension = base_plus_ext(member["fname"])
                if member_key is None:  # no extension: not part of any sample
                    continue
                if member_key != key:
                    if key is not None:
                        yield from finish(key, files)
                    key, files = member_key, {}
                files[extension.lower()] = member["data"]
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            reason = f"tar cut short or corrupt after {key}: {str(e).split(' @ ')[0]}"  # webdataset appends a repr
            if key is not None and _whole({**waiting.get(key, {}), **files}):
                yield from finish(key, files)
                key, files = f"{key}+", {}  # what came after the last whole member
            waiting.pop(key, None)
            yield key or "(start)", None, None, reason
        else:
            if key is not None:
                yield from finish(key, files)
    for incomplete, parts in waiting.items():
        yield incomplete, *caption_and_image(incomplete, parts)


def _whole(files: dict[str, bytes]) -> bool:
    return any(e in files for e in IMAGE_EXTENSIONS) and any(e in files for e in CAPTION_EXTENSIONS)


def caption_and_image(key: str, files: dict[str, bytes]) -> tuple[str | None, bytes | None, str | None]:
    image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
    caption, problem = None, None
    if "txt" in files:
        try:
            caption = files["txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            problem = f"invalid UTF-8 at byte {e.start} of {key}.txt"
    elif "json" in files:
        try:
            meta = json.loads(files["json"])
            caption = meta.get("caption") or meta.get("text")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            problem = f"unreadable {key}.json: {e}"
    else:
        problem = "no caption (.txt or .json)"
    if image is None:
        problem = problem or f"no image ({', '.join('.' + e for e in IMAGE_EXTENSIONS)})"
    return caption.strip() if caption else caption, image, problem
