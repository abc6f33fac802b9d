"""Look at a dataset before training on it: counts, caption lengths in characters and jieba words,
image sizes and aspect ratios, a histogram plot and a page of random sample pairs.

    python data_tools/inspect_data.py <anything build_shards reads, shards included> --out report/ \
        [--split train] [--limit 100000] [--samples 24]

Writes report/stats.json, report/histograms.png and report/samples.html and prints the summary.
Image sizes are read from the file headers; --limit inspects the first N pairs of a large source.
Only the samples shown are decoded whole: one that does not decode (a damaged body behind a good
header) is left off the page and counted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from chinese_clip.data.images import open_image, to_rgb
from chinese_clip.data.readers import read_pairs
from chinese_clip.data.report import collect, plot, sample_page


def format_summary(summary: dict) -> str:
    lines = [f"{'pairs read':<28}{summary['pairs']:>12,}", f"{'measured':<28}{summary['measured']:>12,}"]
    lines += [f"  unreadable: {reason:<14}{n:>12,}" for reason, n in summary["unreadable"].items()]
    lines.append(f"{'samples that do not decode':<28}{summary['samples that do not decode']:>12,}")
    lines.append(f"\n{'':<28}{'min':>9}{'p5':>9}{'median':>9}{'p95':>9}{'max':>9}")
    for name, p in summary.items():
        if isinstance(p, dict) and "median" in p:
            lines.append(f"{name:<28}" + "".join(f"{p[k]:>9.3g}" for k in ("min", "p5", "median", "p95", "max")))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--split", default="train", help="for Chinese-CLIP's {split}_imgs.tsv layout")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--samples", type=int, default=24)
    args = parser.parse_args(argv)
    try:
        stats, samples = collect(read_pairs(args.source, args.split), args.limit, args.samples)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    shown = []
    for data, caption in samples:
        try:
            image = to_rgb(open_image(data))  # the header's size first: a decompression bomb is never decoded
        except Exception:  # PIL raises many types for a file it cannot decode
            continue
        shown.append((image, caption, f"{image.width}x{image.height}, {len(caption)} chars"))
    summary = stats.summary()
    summary["samples that do not decode"] = len(samples) - len(shown)
    args.out.mkdir(parents=True, exist_ok=True)
    # written aside and moved in only once all three are whole: a failure part-way leaves no truncated
    # file and an earlier report untouched
    with tempfile.TemporaryDirectory(dir=args.out, prefix=".partial-") as scratch:
        scratch = Path(scratch)
        (scratch / "stats.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
        plot(stats, scratch / "histograms.png")
        (scratch / "samples.html").write_text(sample_page(shown, f"samples of {args.source}"), encoding="utf-8")
        for name in ("stats.json", "histograms.png", "samples.html"):
            os.replace(scratch / name, args.out / name)
    print(format_summary(summary))
    print(f"\nwrote {args.out / 'stats.json'}, {args.out / 'histograms.png'}, {args.out / 'samples.html'}")
    return summary


if __name__ == "__main__":
    main()
