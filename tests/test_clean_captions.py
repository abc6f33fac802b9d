"""data_tools/clean_captions.py: every row of the input is kept or reported with its reason; exact
and near duplicates go, different captions stay; the output is training input."""
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from chinese_clip.config import DataConfig, ShardSourceConfig
from chinese_clip.data.captions import caption_problem, normalise_caption
from chinese_clip.data.clean import CleanRules, Deduplicator, clean_shards, shingles
from chinese_clip.data.shards import SCHEMA
from chinese_clip.data.stream import open_sources
from tests.conftest import ROOT



def jpeg(colour) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(out, format="JPEG")
    return out.getvalue()


RED, BLUE = jpeg((200, 0, 0)), jpeg((0, 0, 200))
CAPTIONS = [  # (caption, image, reason the row is removed for with dedup=captions, or None)
    ("一只橘色的小猫趴在窗台上晒太阳", RED, None),
    ("一只橘色的小猫趴在窗台上晒太阳", BLUE, "exact duplicate of 00000-000000"),
    ("一只橘色的小猫趴在窗台上晒太阳呢", RED, "near duplicate of 00000-000000"),
    ("＂一只橘色的小猫＂ 趴在窗台上晒太阳", RED, "near duplicate of 00000-000000 (Jaccard 1.00)"),  # same words
    ("海边的日落，天空被染成了橙红色", RED, None),
    ("😀😀🎉", RED, "emoji only"),
    ("IMG_2041.jpg", RED, "no Chinese characters"),
    ("雪山脚下的湖泊倒映着蓝天白云", BLUE, None),
]


def write_shards(path, rows_per_shard=4):
    path.mkdir(parents=True)
    rows = [{"id": f"{i // rows_per_shard:05d}-{i % rows_per_shard:06d}", "caption": c, "image": img, "width": 40,
             "height": 40, "source": f"in:{i}"} for i, (c, img, _) in enumerate(CAPTIONS)]
    for shard in range(0, len(rows), rows_per_shard):
        pq.write_table(pa.Table.from_pylist(rows[shard:shard + rows_per_shard], schema=SCHEMA),
                       path / f"shard-{shard // rows_per_shard:05d}.parquet")
    return path


def kept_and_removed(out):
    kept = [r for f in sorted(out.glob("shard-*.parquet")) for r in pq.read_table(f).to_pylist()]
    removed = [json.loads(line) for f in sorted((out / "removed").glob("*.jsonl"))
               for line in f.read_text(encoding="utf-8").splitlines()]
    return kept, removed


def test_duplicates_and_unusable_captions_are_removed_with_their_reason(tmp_path):
    source = write_shards(tmp_path / "in")
    counts = clean_shards(source, tmp_path / "out", CleanRules())
    kept, removed = kept_and_removed(tmp_path / "out")
    assert counts["inputs"] == len(CAPTIONS) == len(kept) + len(removed)
    assert [r["caption"] for r in kept] == [normalise_caption(c) for c, _, reason in CAPTIONS if reason is None]
    reasons = {r["id"]: r["reason"] for r in removed}
    for i, (_, _, expected) in enumerate(CAPTIONS):
        if expected is not None:
            assert reasons[f"{i // 4:05d}-{i % 4:06d}"].startswith(expected)
    assert dict(counts["reasons"]) == {"exact duplicate": 1, "near duplicate": 2, "emoji only": 1,
                                       "no Chinese characters": 1}
    # the output is training input: the start-up check accepts it and its summary matches
    [source_info] = open_sources(DataConfig(source="shards", shards=[ShardSourceConfig(str(tmp_path / "out"))]), 1,
                                 say=lambda _: None)
    assert source_info.rows == 3


def test_pairs_mode_keeps_one_caption_on_several_images(tmp_path):
    source = write_shards(tmp_path / "in")
    counts = clean_shards(source, tmp_path / "out", CleanRules(dedup="pairs"))
    kept, removed = kept_and_removed(tmp_path / "out")
    assert [r["image"] == BLUE for r in kept if r["caption"] == CAPTIONS[0][0]] == [False, True]
    assert {r["reason"] for r in removed} == {"emoji only", "no Chinese characters"}
    assert counts["written"] == 6  # near duplicates stay: only an identical caption on an identical image goes
    pairs = Deduplicator(CleanRules(dedup="pairs"))
    assert [pairs.duplicate_of(i, CAPTIONS[0][0], image) for i, image in (("a", RED), ("b", BLUE), ("c", RED))] == \
        [None, None, "exact duplicate of a"]


def test_near_duplicates_are_judged_on_words_not_characters():
    a, b = shingles("一只橘色的小猫趴在窗台上"), shingles("一只橘色的小猫趴在窗台上呢")
    assert len(a & b) / len(a | b) >= CleanRules().near_threshold  # exact set arithmetic
    assert not shingles("一只橘色的小猫") & shingles("一只黑色的小狗")
    assert caption_problem("🎉🎉 ✨") == "emoji only"


def test_traditional_captions_become_simplified_on_request(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    pq.write_table(pa.Table.from_pylist([{"id": "00000-000000", "caption": "這是一隻可愛的貓", "image": RED, "width": 40,
                                          "height": 40, "source": "x"}], schema=SCHEMA), source / "shard-00000.parquet")
    clean_shards(source, tmp_path / "out", CleanRules(to_simplified=True))
    assert kept_and_removed(tmp_path / "out")[0][0]["caption"] == "这是一只可爱的猫"


def test_the_command_prints_the_summary_and_refuses_a_directory_without_shards(tmp_path, in_process):
    source = write_shards(tmp_path / "in")
    tool = str(ROOT / "data_tools" / "clean_captions.py")
    result = in_process(tool, str(source), "--out", str(tmp_path / "out"), "--exact-only")
    assert result.returncode == 0, result.stderr
    assert "exact duplicate" in result.stdout and "near duplicate" not in result.stdout
    result = in_process(tool, str(tmp_path), "--out", str(tmp_path / "x"))
    assert result.returncode == 1 and "no shard-*.parquet files" in result.stderr
