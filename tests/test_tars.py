"""chinese_clip/data/tars.py: samples do not depend on the members' order, and what one tar holds in memory
is bounded (small caps here, for speed)."""
import io
import json
import random
import tarfile
from pathlib import Path

from chinese_clip.data import tars
from chinese_clip.data.tars import tar_samples

MiB = 1 << 20


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_a_member_over_the_size_cap_is_a_problem_and_is_not_read(tmp_path, monkeypatch):
    monkeypatch.setattr(tars, "MAX_MEMBER_BYTES", MiB)
    read, extractfile = [], tarfile.TarFile.extractfile

    def reading(tar, member):
        read.append(member.name)
        return extractfile(tar, member)
    monkeypatch.setattr(tarfile.TarFile, "extractfile", reading)
    path = write_tar(tmp_path / "x.tar", [("0.jpg", b"j" * MiB), ("0.txt", "一只猫".encode()),
                                          ("1.jpg", b"j" * (MiB + 1)), ("1.txt", "一只狗".encode()),
                                          ("2.jpg", b"j" * 10), ("2.txt", "一只鸟".encode())])
    assert [(key, caption, problem) for key, caption, _, problem in tar_samples(path)] == [
        ("0", "一只猫", None), ("1", None, "1.jpg is 1,048,577 bytes, over the 1 MiB limit"), ("2", "一只鸟", None)]
    assert "1.jpg" not in read and "0.jpg" in read


def test_incomplete_samples_wait_only_up_to_the_cap_the_oldest_going_out_first(tmp_path, monkeypatch):
    monkeypatch.setattr(tars, "MAX_WAITING_BYTES", MiB)
    image = MiB * 2 // 5
    # as a directory's order may have them: three images, then their captions
    path = write_tar(tmp_path / "x.tar", [("a.jpg", b"a" * image), ("b.jpg", b"b" * image), ("c.jpg", b"c" * image),
                                          ("a.txt", "一只猫".encode()), ("b.txt", "一只狗".encode()),
                                          ("c.txt", "一只鸟".encode())])
    samples = [(key, caption, data and data[:1], problem) for key, caption, data, problem in tar_samples(path)]
    assert samples == [("a", None, None, "image and caption too far apart in the tar: over 1 MiB of incomplete "
                                         "samples came between them"),
                       ("b", "一只狗", b"b", None), ("c", "一只鸟", b"c", None)]  # a.txt: a's sample is out
    monkeypatch.setattr(tars, "MAX_WAITING_BYTES", 3 * image)
    assert [problem for *_, problem in tar_samples(path)] == [None, None, None]


def test_every_order_of_the_same_members_gives_the_same_samples(tmp_path):
    """img2dataset's samples (.jpg, .txt and a .json without a caption field) in the orders tars come in:
    sorted, `tar -cf x.tar .`'s directory order (here: shuffled), by extension, reversed. A sample is out
    only when its caption is there: an image and its .json once went out whole and left the .txt over."""
    members = []
    for i in range(12):
        members += [(f"{i:03d}.jpg", bytes([i]) * 100), (f"{i:03d}.txt", f"第{i}张图".encode()),
                    (f"{i:03d}.json", json.dumps({"key": f"{i:03d}", "status": "success"}).encode())]
    members += [("012.jpg", b"j"), ("012.json", json.dumps({"caption": "只在json里"}).encode())]  # a caption in its .json
    orders = {"sorted": sorted(members), "reversed": sorted(members, reverse=True),
              "by extension": sorted(members, key=lambda m: (m[0].split(".")[1], m[0])),
              "shuffled": random.Random(0).sample(members, len(members))}
    expected = {(f"{i:03d}", f"第{i}张图", bytes([i]) * 100, None) for i in range(12)} | {("012", "只在json里", b"j", None)}
    for name, order in orders.items():
        samples = list(tar_samples(write_tar(tmp_path / f"{name}.tar", order)))
        assert set(samples) == expected and len(samples) == len(expected), name
