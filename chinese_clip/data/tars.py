"""webdataset tars (img2dataset's output): image-caption samples streamed out of local or remote
tars one at a time.

Member names are split into sample key and extension by webdataset's own rule (`base_plus_ext`):
the key is the member's directory plus its basename up to the basename's first dot
(`./000000.jpg` and `./000000.txt` are sample `./000000`; `a.b/0001.jpg` is `a.b/0001`). Where we
must differ from webdataset is order: it groups only adjacent members, so a tar made with
`tar -cf x.tar .` (members in directory order, a sample's image and caption apart) would come out as
halves. Here a run of adjacent members that lacks its image or caption waits for the rest of its
key; a sample goes out once it has both (a caption is a .txt, or a .json that holds one), and a
member of it that comes later is left out, so every order of the same members gives the same
samples. Only incomplete samples are ever held, and only up to MAX_WAITING_BYTES. The caption is `.txt`, else `.json`'s caption or text; the image `.jpg`, `.jpeg`,
`.png` or `.webp`; other members are not read, nor is one over MAX_MEMBER_BYTES.
"""
from __future__ import annotations

import json
import re
import tarfile
from typing import Iterator

from webdataset.tariterators import base_plus_ext

from chinese_clip.data.storage import open_binary

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "json")
# A member is read whole into memory. Web photos are a few MB and captions far less (an image over
# build_shards' 8192x8192 pixel limit is refused anyway), so a bigger member is no training sample:
# a video, a dump, or a size read from a damaged header.
MAX_MEMBER_BYTES = 64 << 20
# Incomplete samples held while their other half may still come, per tar being read (one per dataloader
# worker). In directory order a sample's halves can be anywhere in the tar; at the peak about a quarter
# of its bytes wait (half the samples are open, half of those with their image), so every pair of a tar
# up to 2 GB is kept (webdataset advises 100 MB to 1 GB); 1 GB if all its images came before the captions.
MAX_WAITING_BYTES = 512 << 20
META = re.compile(r"__[^/]*__($|/)")  # webdataset's rule for members that belong to no sample (__MACOSX/, ...)

Sample = tuple[str, str | None, bytes | None, str | None]  # key, caption, image, problem


def tar_samples(url: str) -> Iterator[Sample]:
    """(key, caption, image, problem) for each sample of one tar. A problem says why the sample
    cannot be used whole; a tar cut short ends with the samples it cut, each with a problem."""
    waiting: dict[str, dict[str, bytes]] = {}  # incomplete samples by key, the longest waiting first
    held = 0  # their bytes
    gone: set[str] = set()  # samples already out: a member of theirs that comes later is left out, not a new sample
    key, files = None, {}

    def finish(key: str, files: dict[str, bytes]) -> Iterator[Sample]:
        """A run of adjacent members ended: its sample goes out if whole now, else waits for the rest."""
        nonlocal held
        if key in gone:
            return
        earlier = waiting.pop(key, {})
        held -= _size(earlier)
        merged = {**earlier, **files}
        if _whole(merged):
            gone.add(key)
            yield key, *caption_and_image(key, merged)
            return
        waiting[key] = merged
        held += _size(merged)
        while held > MAX_WAITING_BYTES:
            oldest = next(iter(waiting))
            held -= _size(waiting.pop(oldest))
            gone.add(oldest)
            yield oldest, None, None, (f"image and caption too far apart in the tar: over "
                                       f"{MAX_WAITING_BYTES >> 20} MiB of incomplete samples came between them")

    with open_binary(url) as stream:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*")  # streaming: each member is read once, in order
            for member in tar:
                tar.members = []  # the archive would otherwise keep every member's header
                name = member.name
                if not member.isreg() or META.match(name):
                    continue
                member_key, extension = base_plus_ext(name)
                if member_key is None:  # no extension: not part of any sample
                    continue
                extension = extension.lower()
                used = extension in IMAGE_EXTENSIONS + CAPTION_EXTENSIONS
                too_big = member.size > MAX_MEMBER_BYTES  # left unread: the stream skips it in small blocks
                # read before the key moves on: a tar cut inside this member is cut after the previous sample
                data = tar.extractfile(member).read() if used and not too_big else None
                if member_key != key:
                    if key is not None:
                        yield from finish(key, files)
                    key, files = member_key, {}
                if used and too_big and key not in gone:
                    gone.add(key)
                    held -= _size(waiting.pop(key, {}))
                    yield key, None, None, (f"{name} is {member.size:,} bytes, over the "
                                            f"{MAX_MEMBER_BYTES >> 20} MiB limit")
                elif used:
                    files[extension] = data
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            reason = f"tar cut short or corrupt after {key}: {e}"
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


def _size(files: dict[str, bytes]) -> int:
    return sum(len(data) for data in files.values())


def _whole(files: dict[str, bytes]) -> bool:
    """An image and a caption: a .txt, or a .json that holds one. img2dataset writes a .json for every
    sample, with a caption only when asked: an image and such a .json still wait for their .txt."""
    if not any(e in files for e in IMAGE_EXTENSIONS):
        return False
    if "txt" in files:
        return True
    try:
        meta = json.loads(files.get("json", b"null"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # said when the tar ends, if no .txt came
    return isinstance(meta, dict) and bool(meta.get("caption") or meta.get("text"))


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
