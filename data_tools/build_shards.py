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

Across machines: N jobs (a SLURM array, a Kubernetes indexed job) each run with `--part I/N` and the
same source and --out; the source's files (its rows, for one table) go round-robin to the parts,
and part I writes `<out>/part-IIIII-of-NNNNN/`. Then `--check <out>` accounts for every input
across the parts; training takes <out> as one source.

    python data_tools/build_shards.py "s3://bucket/laion-zh/{00000..09999}.tar" --out /shared/shards --part 3/32
    python data_tools/build_shards.py --check /shared/shards
"""
from __future__ import annotations

import argparse
import os
import sys

from chinese_clip.data.captions import CaptionRules
from chinese_clip.data.images import ImageRules
from chinese_clip.data.readers import Part, part_argument, read_pairs
from chinese_clip.data.shards import ShardRules, build_shards, check_parts, summary_table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?")
    parser.add_argument("--out")
    parser.add_argument("--part", type=part_argument, default=Part(), metavar="I/N",
                        help="build part I (0-based) of N; every part writes its own part directory in --out")
    parser.add_argument("--check", metavar="OUT", help="check a build split with --part: every input in exactly one part")
    parser.add_argument("--split", default="train", help="for Chinese-CLIP's {split}_imgs.tsv layout")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--rows-per-shard", type=int, default=1000)
    parser.add_argument("--min-side", type=int, default=ImageRules.min_side)
    parser.add_argument("--max-aspect", type=float, default=ImageRules.max_aspect)
    parser.add_argument("--max-short-side", type=int, default=None, help="shrink larger images to this shorter side")
    parser.add_argument("--min-words", type=int, default=CaptionRules.min_words)
    parser.add_argument("--max-chars", type=int, default=CaptionRules.max_chars)
    args = parser.parse_args(argv)
    if args.check:
        try:
            counts = check_parts(args.check)
        except ValueError as e:
            sys.exit(f"error: {e}")
        print(summary_table(counts))
        return counts
    if args.source is None or args.out is None:
        parser.error("give a source and --out, or --check OUT")
    rules = ShardRules(image=ImageRules(min_side=args.min_side, max_aspect=args.max_aspect,
                                        max_short_side=args.max_short_side),
                       caption=CaptionRules(min_words=args.min_words, max_chars=args.max_chars))
    try:
        pairs = read_pairs(args.source, args.split, args.part)
        counts = build_shards(pairs, args.out, rules, rows_per_shard=args.rows_per_shard, workers=args.workers,
                              part=args.part)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(summary_table(counts))
    return counts


if __name__ == "__main__":
    main()
