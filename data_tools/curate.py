"""Curate noisy image-text pairs by a trained model's score before training on them: every pair is
cleaned as build_shards does, scored (the cosine of its image and caption under --model) and kept
only at or above a threshold; the output is build_shards' shards with a score column.

    python data_tools/curate.py <anything build_shards reads> --model runs/<name>/model --out curated/ \
        (--min-score 0.25 | --keep-fraction 0.5) [--workers 8] [--batch-size 256] [--num-workers 4]

Across machines: N jobs each run with `--part I/N` (no threshold), cleaning and scoring their share
of the source into <out>/work/; then `--select --out <out> (--min-score S | --keep-fraction F)`
checks that every part is there and scored and keeps pairs by one threshold over all of them
(a fraction of the whole input), writing <out>/part-IIIII-of-NNNNN/ as build_shards --part does.

--model takes anything `load_model` reads (a run's model/, an HF ChineseCLIPModel directory, a
Chinese-CLIP .pt); a model trained on the noisy data itself is enough. Every dropped input is listed
in <out>/quarantine/ with its reason; <out>/summary.json counts them. Cleaning and scoring resume
after an interruption and are kept in <out>/work/: running again with another threshold only
rewrites the shards. Train on <out> (`data.shards=[{path: curated/}]`), and raise the threshold
without a rebuild with `min_score`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from chinese_clip.config import ConfigError
from chinese_clip.data.curate import CurateError, curate, select
from chinese_clip.data.readers import Part, part_argument, read_pairs
from chinese_clip.data.shards import summary_table
from chinese_clip.data.storage import overlaps
from chinese_clip.inference import load_model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?")
    parser.add_argument("--out", required=True)
    parser.add_argument("--model")
    parser.add_argument("--min-score", type=float, help="keep the pairs whose cosine is at least this")
    parser.add_argument("--keep-fraction", type=float, help="keep this fraction of the usable pairs, the best-scoring")
    parser.add_argument("--part", type=part_argument, default=Part(), metavar="I/N",
                        help="clean and score part I (0-based) of N only; --select then keeps pairs across all parts")
    parser.add_argument("--select", action="store_true",
                        help="only choose the pairs (over every part) of what is cleaned and scored in --out")
    parser.add_argument("--split", default="train", help="for Chinese-CLIP's {split}_imgs.tsv layout")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes cleaning the input")
    parser.add_argument("--rows-per-shard", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers decoding images for scoring")
    args = parser.parse_args(argv)
    if not args.select and (args.source is None or args.model is None):
        parser.error("give a source and --model (or --select to choose over what is already scored)")
    if args.source and overlaps(args.out, args.source):
        sys.exit(f"error: --out {args.out} overlaps the source {args.source}: curate into a directory of its own")
    try:
        if args.select:
            counts = select(Path(args.out) / "work", Path(args.out), args.min_score, args.keep_fraction)
        else:
            predictor = load_model(args.model, batch_size=args.batch_size, num_workers=args.num_workers)
            counts = curate(read_pairs(args.source, args.split, args.part), f"{args.source} ({args.split})",
                            Path(args.out), args.model, predictor, args.min_score, args.keep_fraction,
                            rows_per_shard=args.rows_per_shard, workers=args.workers, part=args.part)
    except (ConfigError, CurateError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(summary_table({**counts, "shards_resumed": counts.get("shards_resumed", 0)}))
    if "threshold" in counts:
        print(f"threshold {counts['threshold']:.4f}: {counts['written']:,} pairs kept in {args.out}")
    else:
        print(f"part {args.part.index}/{args.part.count} cleaned and scored; once every part is, choose the pairs: "
              f"data_tools/curate.py --select --out {args.out} (--min-score S | --keep-fraction F)")
    return counts

if __name__ == "__main__":
    main()
