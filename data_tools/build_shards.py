"""Build validated parquet shards from image-text pairs in any layout the readers know (tars and
parquet files also by URL, brace list or glob: "s3://bucket/tars/{00000..00099}.tar").

    python data_tools/build_shards.py <table.csv|.tsv|.jsonl | cn_clip dir | LMDB dir | image folder> \
        --out shards/ [--split train] [--workers 8] [--rows-per-shard 1000] [--max-short-side 512]

Each image is decoded once: unusable ones (empty, not an image, truncated, decompression bomb,
smaller than --min-side, aspect beyond --max-aspect) and unusable captions (empty, no Chinese,
fewer than --min-words jieba words, longer than --max-chars) go to `quarantine/*.jsonl` with the
reason; the rest are converted to RGB, optionally shrunk, re-encoded as JPEG and written to
`shard-NNNNN.parquet`. Running it again on the same input resumes after the last finished shard.
Every input row ends in a shard or in the quarantine report; the summary says how many of each.
"""
from __future__ import annotations

import argparse
import os
import sys

from chinese_clip.data.captions import CaptionRules
from chinese_clip.data.images import ImageRules
from chinese_clip.data.readers import read_pairs
from chinese_clip.data.shards import ShardRules, build_shards, summary_table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("--out", required=True)
    parser.add_argument("--split", default="train", help="for Chinese-CLIP's {split}_imgs.tsv layout")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--rows-per-shard", type=int, default=1000)
    parser.add_argument("--min-side", type=int, default=ImageRules.min_side)
    parser.add_argument("--max-aspect", type=float, default=ImageRules.max_aspect)
    parser.add_argument("--max-short-side", type=int, default=None, help="shrink larger images to this shorter side")
    parser.add_argument("--min-words", type=int, default=CaptionRules.min_words)
    parser.add_argument("--max-chars", type=int, default=CaptionRules.max_chars)
    args = parser.parse_args(argv)
    rules = ShardRules(image=ImageRules(min_side=args.min_side, max_aspect=args.max_aspect,
                                        max_short_side=args.max_short_side),
                       caption=CaptionRules(min_words=args.min_words, max_chars=args.max_chars))
    try:
        pairs = read_pairs(args.source, args.split)
        counts = build_shards(pairs, args.out, rules, rows_per_shard=args.rows_per_shard, workers=args.workers)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(summary_table(counts))
    return counts


if __name__ == "__main__":
    main()
