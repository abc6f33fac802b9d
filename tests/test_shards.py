"""data_tools/build_shards.py: every reader on generated data (tars as webdataset groups them, tables
streamed), builds split into parts and their check, and a corrupt-input suite in which
each input lands in a shard or in the quarantine report with the right reason."""
import base64
import io
import json
import pickle
import shutil
import struct
import subprocess
import tarfile
import tracemalloc
import zlib
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from chinese_clip.config import ConfigError, DataConfig, ShardSourceConfig
from chinese_clip.data.images import decode_image
from chinese_clip.data.readers import Part, read_pairs
from chinese_clip.data.shards import build_shards, check_parts
from chinese_clip.data.stream import open_sources, shard_files
from data_tools.build_shards import main as build_shards_cli
from tests.conftest import ROOT, write_tars

GOOD_CAPTION = "一只橘色的猫趴在窗台上"


def encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def photo(size=(80, 60), seed=0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def bomb() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def rows(shard_dir: Path) -> list[dict]:
    return [row for shard in sorted(shard_dir.glob("shard-*.parquet")) for row in pq.read_table(shard).to_pylist()]


def quarantine(shard_dir: Path) -> dict[str, str]:
    lines = [json.loads(line) for file in sorted((shard_dir / "quarantine").glob("*.jsonl"))
             for line in file.read_text(encoding="utf-8").splitlines()]
    return {d["source"]: d["reason"] for d in lines}


# (file name, bytes or None for no file, caption, where it must land: "shard" or the reason's start)
SUITE = [
    ("good.jpg", encoded(photo(), "JPEG"), GOOD_CAPTION, "shard"),
    ("alpha.png", encoded(Image.new("RGBA", (64, 64), (0, 0, 255, 128)), "PNG"), GOOD_CAPTION, "shard"),
    ("palette.gif", encoded(photo().convert("P"), "GIF"), GOOD_CAPTION, "shard"),
    ("cmyk.jpg", encoded(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG"), GOOD_CAPTION, "shard"),
    ("deep.png", encoded(Image.fromarray(np.full((48, 48), 40000, dtype=np.uint16)), "PNG"), GOOD_CAPTION, "shard"),
    ("truncated.jpg", encoded(photo((256, 256)), "JPEG")[:4000], GOOD_CAPTION, "truncated or corrupt"),
    ("zero.jpg", b"", GOOD_CAPTION, "empty file"),
    ("text.jpg", "这不是图片".encode(), GOOD_CAPTION, "not an image"),
    ("tiny.png", encoded(photo((1, 1)), "PNG"), GOOD_CAPTION, "too small"),
    ("sliver.png", encoded(photo((20000, 10)), "PNG"), GOOD_CAPTION, "too small"),
    ("bomb.png", bomb(), GOOD_CAPTION, "decompression bomb"),
    ("empty_caption.jpg", encoded(photo(seed=1), "JPEG"), "", "empty caption"),
    ("long_caption.jpg", encoded(photo(seed=2), "JPEG"), "长" * 10000, "too long"),
    ("missing.jpg", None, GOOD_CAPTION, "image file not found"),
]


@pytest.fixture
def csv_dataset(tmp_path) -> Path:
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    lines = [b"image_path,text"]
    for name, content, caption, _ in SUITE:
        if content is not None:
            (data / "images" / name).write_bytes(content)
        lines.append(f"images/{name},{caption}".encode())
    lines.append("images/good.jpg,".encode() + "猫".encode("gbk") + b"\xff\xfe")  # a GBK line in a UTF-8 file
    (data / "pairs.csv").write_bytes(b"\n".join(lines) + b"\n")
    return data / "pairs.csv"


def test_every_input_lands_in_a_shard_or_in_quarantine_with_its_reason(csv_dataset, tmp_path):
    out = tmp_path / "shards"
    counts = build_shards(read_pairs(csv_dataset), out, rows_per_shard=4)
    kept, dropped = rows(out), quarantine(out)
    assert counts["inputs"] == len(SUITE) + 1 == len(kept) + len(dropped)
    for number, (name, _, _, expected) in enumerate(SUITE, start=2):
        key = f"pairs.csv:{number}"
        if expected == "shard":
            assert key in {row["source"] for row in kept}, (name, dropped.get(key))
        else:
            assert dropped[key].startswith(expected), (name, dropped.get(key))
    assert dropped[f"pairs.csv:{len(SUITE) + 2}"].startswith("invalid UTF-8")
    for row in kept:  # what training will read: RGB JPEGs and normalised captions
        image = decode_image(row["image"])
        assert image.mode == "RGB" and image.size == (row["width"], row["height"]) and row["caption"] == GOOD_CAPTION
    assert len({row["id"] for row in kept}) == len(kept)
    assert json.loads((out / "summary.json").read_text())["reasons"]["too small"] == 2


def test_an_interrupted_build_resumes_without_duplicates_on_two_workers(csv_dataset, tmp_path):
    out = tmp_path / "shards"
    build_shards(read_pairs(csv_dataset), out, rows_per_shard=4)
    first = rows(out)
    (out / "shard-00002.parquet").unlink()  # as if killed while writing the third shard
    (out / "shard-00003.parquet").unlink()
    counts = build_shards(read_pairs(csv_dataset), out, rows_per_shard=4, workers=2)
    assert counts["shards_resumed"] == 2 and counts["inputs"] == len(first) + counts["quarantined"]
    assert rows(out) == first


def test_chinese_clip_layouts_and_image_folders_are_read(tmp_path):
    images = {str(i): encoded(photo(seed=i), "JPEG") for i in range(3)}
    texts = [{"text_id": 0, "text": "红色的花", "image_ids": [0, 1]}, {"text_id": 1, "text": "蓝色的海", "image_ids": [2, 7]}]
    tsv = tmp_path / "tsv"
    tsv.mkdir()
    (tsv / "valid_imgs.tsv").write_text("".join(f"{i}\t{base64.urlsafe_b64encode(b).decode()}\n" for i, b in images.items()))
    (tsv / "valid_texts.jsonl").write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts))
    pairs = list(read_pairs(tsv, split="valid"))
    assert [(p.caption, p.image is not None and p.image == images[p.key.rsplit("/", 1)[1]], p.problem)
            for p in pairs] == [
        ("红色的花", True, None), ("红色的花", True, None), ("蓝色的海", True, None),
        ("蓝色的海", False, "image id 7 not in valid_imgs.tsv")]

    import lmdb  # the layout Chinese-CLIP's build_lmdb_dataset.py writes
    lmdb_dir = tmp_path / "lmdb"
    ran = tmp_path / "payload-ran"

    class Payload:  # a downloaded LMDB's record that runs code when unpickled
        def __reduce__(self):
            return exec, (f"open({str(ran)!r}, 'w').write('ran')",)

    for name, entries in [("imgs", {**{k: base64.urlsafe_b64encode(v) for k, v in images.items()}, "num_images": b"3"}),
                          ("pairs", {"0": pickle.dumps((0, 0, "红色的花")), "1": pickle.dumps((2, 1, "蓝色的海")),
                                     "2": pickle.dumps((1, 2, Payload())), "num_samples": b"3"})]:
        (lmdb_dir / name).mkdir(parents=True)
        env = lmdb.open(str(lmdb_dir / name), map_size=1 << 24)
        with env.begin(write=True) as txn:
            for key, value in entries.items():
                txn.put(key.encode(), value)
        env.close()
    assert [(p.caption, p.image, p.problem) for p in read_pairs(lmdb_dir)] == [
        ("红色的花", images["0"], None), ("蓝色的海", images["2"], None),
        (None, None, "record not a plain pickled tuple, not read (it asks for builtins.exec)")]
    assert not ran.exists()

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(images["0"])
    (folder / "a.txt").write_text(" 一只猫 \n")
    (folder / "b.png").write_bytes(images["1"])
    assert [(p.key, p.caption, p.problem) for p in read_pairs(folder)] == [
        ("a.jpg", "一只猫", None), ("b.png", None, "no caption file b.txt")]


def test_the_tool_prints_a_summary_and_names_a_missing_source(csv_dataset, tmp_path, in_process):
    tool = str(ROOT / "data_tools" / "build_shards.py")
    result = in_process(tool, str(csv_dataset), "--out", str(tmp_path / "s"), "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert "inputs" in result.stdout and "quarantined" in result.stdout and "too small" in result.stdout
    result = in_process(tool, str(tmp_path / "nowhere"), "--out", str(tmp_path / "s"))
    assert result.returncode == 1 and result.stderr.strip() == f"error: {tmp_path / 'nowhere'}: no such file or directory"


def test_webdataset_tars_and_parquet_files_are_read(tmp_path):
    import pyarrow as pa

    images = [encoded(photo(seed=i), "JPEG") for i in range(3)]
    tar_path = tmp_path / "shard-000000.tar"
    with tarfile.open(tar_path, "w") as tar:
        members = [("000000.jpg", images[0]), ("000000.txt", "红色的花".encode()),
                   ("000001.jpg", images[1]), ("000001.json", json.dumps({"caption": "蓝色的海"}).encode()),
                   ("000002.jpg", images[2])]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert [(p.key, p.caption, p.image == images[i], p.problem) for i, p in enumerate(read_pairs(tmp_path))] == [
        ("shard-000000.tar/000000", "红色的花", True, None), ("shard-000000.tar/000001", "蓝色的海", True, None),
        ("shard-000000.tar/000002", None, True, "no caption (.txt or .json)")]

    table = pa.table({"image": [{"bytes": images[0], "path": None}, {"bytes": None, "path": "x.jpg"}],
                      "caption": ["红色的花", "蓝色的海"]})
    pq.write_table(table, tmp_path / "pairs.parquet")
    assert [(p.caption, p.image == images[0], p.problem) for p in read_pairs(tmp_path / "pairs.parquet")] == [
        ("红色的花", True, None), ("蓝色的海", False, "no image bytes")]
    # this project's own shards read back as input
    out = tmp_path / "shards"
    build_shards(read_pairs(tar_path), out)
    assert [p.caption for p in read_pairs(out)] == ["红色的花", "蓝色的海"]
    pq.write_table(pa.table({"url": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet: expected an image column"):
        list(read_pairs(tmp_path / "bad.parquet"))


def test_a_quoted_csv_field_may_span_lines_and_a_bad_row_does_not_take_its_neighbours(tmp_path):
    (tmp_path / "a.jpg").write_bytes(encoded(photo(), "JPEG"))
    (tmp_path / "pairs.csv").write_bytes("text,image_path\n\"一只猫,\n趴在窗台上\",a.jpg\n".encode()
                                         + b"\xff\xfe broken,a.jpg\n" + "\"最后\"\"一行\"\"\",a.jpg\n".encode())
    pairs = list(read_pairs(tmp_path / "pairs.csv"))
    assert [(p.key, p.caption, p.problem) for p in pairs] == [
        ("pairs.csv:2", "一只猫,\n趴在窗台上", None), ("pairs.csv:4", None, "invalid UTF-8 in pairs.csv:4"),
        ("pairs.csv:5", '最后"一行"', None)]


def _keys_and_problems(source) -> list[tuple[str, str | None]]:
    return [(p.key, p.problem) for p in read_pairs(source)]


def test_tar_members_group_into_samples_by_webdatasets_rule(tmp_path):
    import webdataset as wds

    # `tar -cf x.tar .` stores ./000000.jpg, ./000000.txt, ...: three pairs, not one caption-less input
    folder = tmp_path / "pairs"
    folder.mkdir()
    for index in range(3):
        (folder / f"{index:06d}.jpg").write_bytes(encoded(photo(seed=index), "JPEG"))
        (folder / f"{index:06d}.txt").write_text(GOOD_CAPTION, encoding="utf-8")
    dotted = tmp_path / "dotted.tar"
    subprocess.run(["tar", "-cf", str(dotted), "."], cwd=folder, check=True)
    assert sorted(_keys_and_problems(dotted)) == [(f"dotted.tar/./{i:06d}", None) for i in range(3)]
    # img2dataset's layout (jpg + txt + json) under directories with dots in their names, and a
    # sample whose caption is missing
    layout = write_tars(tmp_path / "img2dataset", pairs=3, per_tar=3, member_prefix="crawl.2024/part.00/")
    with tarfile.open(layout / "00000.tar", "a") as tar:
        info = tarfile.TarInfo("crawl.2024/part.00/000000003.jpg")
        info.size = len(image := encoded(photo(seed=9), "JPEG"))
        tar.addfile(info, io.BytesIO(image))
    assert _keys_and_problems(layout / "00000.tar") == [
        *[(f"00000.tar/crawl.2024/part.00/{i:09d}", None) for i in range(3)],
        ("00000.tar/crawl.2024/part.00/000000003", "no caption (.txt or .json)")]
    # the same keys as webdataset's own reader where members are in order
    theirs = [sample["__key__"] for sample in wds.WebDataset(str(layout / "00000.tar"), shardshuffle=False)]
    assert [key.split("/", 1)[1] for key, _ in _keys_and_problems(layout / "00000.tar")] == theirs

    # cut in the middle of the third sample's image: two pairs, and one input for what was lost
    data = (layout / "00000.tar").read_bytes()
    cut = tmp_path / "cut" / "cut.tar"
    cut.parent.mkdir()
    cut.write_bytes(data[:data.index(b"000000002.jpg") + 512 + 100])
    pairs = _keys_and_problems(cut)
    assert [key for key, problem in pairs if problem is None] == [f"cut.tar/crawl.2024/part.00/{i:09d}" for i in range(2)]
    assert len(pairs) == 3 and pairs[2][1].startswith("tar cut short or corrupt after crawl.2024/part.00/000000001")

    counts = build_shards(read_pairs(tmp_path / "cut"), tmp_path / "out")
    assert (counts["inputs"], counts["written"], counts["quarantined"]) == (3, 2, 1)
    counts = build_shards(read_pairs(dotted), tmp_path / "out_dotted")
    assert (counts["inputs"], counts["written"]) == (3, 3)


def _sources(shard_dir: Path) -> list[str]:
    return sorted(row["source"] for shard in shard_dir.rglob("shard-*.parquet") for row in pq.read_table(shard).to_pylist())


def _quarantined(shard_dir: Path) -> list[str]:
    return sorted(json.loads(line)["source"] for file in shard_dir.rglob("quarantine/*.jsonl")
                  for line in file.read_text(encoding="utf-8").splitlines())


def test_a_build_split_into_parts_writes_what_one_build_writes_and_the_check_adds_the_parts_up(csv_dataset, tmp_path,
                                                                                                   in_process):
    tars = write_tars(tmp_path / "tars", pairs=10, per_tar=2, image_size=32)  # 5 tars split by file
    for source in (csv_dataset, tars):  # one table: split by row
        whole = build_shards_cli([str(source), "--out", str(tmp_path / "whole" / source.name), "--workers", "1", "--rows-per-shard", "2"])
        parts = tmp_path / "parts" / source.name
        for index in range(3):
            build_shards_cli([str(source), "--out", str(parts), "--part", f"{index}/3", "--workers", "1", "--rows-per-shard", "2"])
        assert sorted(p.name for p in parts.iterdir()) == [f"part-0000{i}-of-00003" for i in range(3)]
        checked = build_shards_cli(["--check", str(parts)])
        assert (checked["inputs"], checked["written"], checked["quarantined"]) == (
            whole["inputs"], whole["written"], whole["quarantined"])
        # the union is one build's inputs, each exactly once
        assert _sources(parts) == _sources(tmp_path / "whole" / source.name)
        assert _quarantined(parts) == _quarantined(tmp_path / "whole" / source.name)
        assert len(shard_files(str(parts))) == sum(len(list(p.glob("shard-*.parquet"))) for p in parts.iterdir())
        [trained] = open_sources(DataConfig(source="shards", shards=[ShardSourceConfig(str(parts))], num_workers=1), 1,
                                 say=lambda _: None)
        assert trained.rows == whole["written"]  # training takes the parts as one source

    parts = tmp_path / "parts" / "tars"
    (parts / "part-00002-of-00003" / "summary.json").unlink()
    with pytest.raises(ValueError, match=r"part 2/3 did not finish \(no summary.json\); run it again"):
        check_parts(parts)
    with pytest.raises(ConfigError, match="did not finish part-00002-of-00003"):
        shard_files(str(parts))
    (parts / "part-00001-of-00003" / "shard-00000.parquet").unlink()
    with pytest.raises(ValueError, match="part-00001-of-00003: shard-00000.parquet is missing"):
        check_parts(parts)
    shutil.rmtree(parts / "part-00002-of-00003")
    with pytest.raises(ValueError, match="part 2/3 is missing"):
        check_parts(parts)
    with pytest.raises(ConfigError, match=r"part 2/3 of the build is missing; run build_shards --part 2/3"):
        shard_files(str(parts))
    result = in_process(str(ROOT / "data_tools" / "build_shards.py"), "--check", str(parts))
    assert result.returncode == 1 and result.stderr.strip() == f"error: {parts}: part 2/3 is missing"


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_huge_table_is_read_row_by_row(tmp_path, suffix):
    (tmp_path / "a.jpg").write_bytes(encoded(photo(), "JPEG"))
    table = tmp_path / f"pairs{suffix}"
    row = (f"a.jpg,{GOOD_CAPTION}\n" if suffix == ".csv"
           else json.dumps({"image_path": "a.jpg", "text": GOOD_CAPTION}, ensure_ascii=False) + "\n")
    table.write_text(("image_path,text\n" if suffix == ".csv" else "") + row * 200_000, encoding="utf-8")
    tracemalloc.start()
    pairs = list(islice(read_pairs(table, part=Part(1, 2)), 100))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(pairs) == 100 and pairs[0].key == f"{table.name}:{3 if suffix == '.csv' else 2}"
    assert peak < table.stat().st_size / 10  # a 7 MB table: the rows read so far, not the file
