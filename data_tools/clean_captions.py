"""Clean the captions of built shards: normalise, filter, and drop exact and near duplicates.

    python data_tools/clean_captions.py shards/ --out shards_clean/ [--dedup captions|pairs|none]
        [--near-threshold 0.8 | --exact-only] [--to-simplified] [--min-words 2] [--max-chars 300]

Captions are normalised (HTML, URLs, full-width characters, quotes, whitespace; --to-simplified
converts traditional characters, with opencc installed), dropped when they are empty, emoji
only, without Chinese, under --min-words jieba words or over --max-chars characters, and dropped
when they repeat a caption kept before them: identically, or (--dedup captions) with at least
--near-threshold Jaccard overlap of their jieba word bigrams. Use --dedup pairs (an identical
caption on an identical image only) or none for datasets that give one caption to several images
on purpose, such as MUGE. Every removed row is listed with its reason in removed/*.jsonl; the
summary counts them.
"""
from __future__ import annotations

import argparse
import sys

from chinese_clip.data.captions import CaptionRules
from chinese_clip.data.clean import CleanRules, clean_shards, clean_summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a directory of shard-*.parquet (build_shards' output)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dedup", choices=["captions", "pairs", "none"], default="captions")
    parser.add_argument("--near-threshold", type=float, default=0.8)
    parser.add_argument("--exact-only", action="store_true", help="no near-duplicate search")
    parser.add_argument("--to-simplified", action="store_true")
    parser.add_argument("--min-words", type=int, default=CaptionRules.min_words)
    parser.add_argument("--max-chars", type=int, default=CaptionRules.max_chars)
    args = parser.parse_args(argv)
    if not 0 < args.near_threshold <= 1:
        parser.error("--near-threshold must be in (0, 1]")
    rules = CleanRules(caption=CaptionRules(min_words=args.min_words, max_chars=args.max_chars), dedup=args.dedup,
                       near_threshold=None if args.exact_only else args.near_threshold,
                       to_simplified=args.to_simplified)
    try:
        counts = clean_shards(args.source, args.out, rules)
    except (FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    print(clean_summary(counts))
    return counts


if __name__ == "__main__":
    main()
